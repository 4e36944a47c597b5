"""bench/train_throughput.py --loss-curve N: N steps of hf, hf again, hf with another LoRA seed and each ftw arm,
run at once on one GPU, their losses compared step by step: whether an ftw arm's curve stays within bf16's
run-to-run noise (hf against hf again) and a user's rerun with another seed (hf against hf_seed1)."""

from __future__ import annotations

import argparse
import json


def compare_losses(a: argparse.Namespace, start_child, finish_child) -> list[dict]:
    """Every run's result, and the summary of the gaps last (printed as LOSS_CURVE)."""
    shape = a.shapes.split(",")[0]
    mbs = str(a.mbs or 2)
    common = [
        "--shape",
        shape,
        "--mbs",
        mbs,
        "--seq",
        str(a.seq),
        "--steps",
        str(a.loss_curve),
        "--warmup",
        "0",
        "--lr",
        str(a.lr),
        "--keep-losses",
    ]
    # the runs share the GPU at once: only their losses count here, not their speed
    compared = [arm for arm in a.arms.split(",") if arm.startswith("ftw")] or ["ftw"]
    # hf_again: bf16's nondeterminism alone; hf_seed1: a user's rerun with another seed (other LoRA A's)
    arms = {"hf": ["hf"], "hf_again": ["hf"], "hf_seed1": ["hf", "--lora-seed", "1"]}
    arms.update({arm: [arm] for arm in compared})
    procs = {name: ([*common, "--arm", *arm], start_child([*common, "--arm", *arm])) for name, arm in arms.items()}
    runs = {name: finish_child(proc, args) for name, (args, proc) in procs.items()}
    results = list(runs.values())
    if all("losses" in r for r in results):

        def gap(x, y):
            d = [abs(p - q) for p, q in zip(x["losses"], y["losses"])]
            return dict(max=round(max(d), 4), mean=round(sum(d) / len(d), 5))

        summary = dict(
            shape=shape,
            steps=a.loss_curve,
            hf_vs_hf_again=gap(runs["hf"], runs["hf_again"]),
            hf_vs_hf_seed1=gap(runs["hf"], runs["hf_seed1"]),
            **{f"{arm}_vs_hf": gap(runs[arm], runs["hf"]) for arm in compared},
            every_20_steps={k: r["losses"][::20] + r["losses"][-1:] for k, r in runs.items()},
        )
        print("LOSS_CURVE " + json.dumps(summary))
        results.append(summary)
    else:
        print(json.dumps(results, indent=1)[-3000:])
    return results
