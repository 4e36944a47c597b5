"""axolotl's side of the parity suite; runs in .venv-axolotl only (never imported by ftw's tests).

    .venv-axolotl/bin/python tests/parity/axolotl_side.py JOBS.json OUT.json

JOBS.json: [{"name", "config": {axolotl config keys}}]. For each job, axolotl's own path: load_cfg
(validation, normalisation) → load_tokenizer → the step of prepare_datasets that loads a dataset
entry and tokenises it with its prompt strategy (_load_and_process_single_dataset). What follows
that step in prepare_datasets (length filter, dedup, shuffle, save) is left out: the rows are short
and kept in order, and a full prepare_datasets costs ~20 s a case on a busy CI machine.
OUT.json: {name: {"input_ids", "labels"} | {"error": text}}, one entry of lists per sample.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


TOKENIZERS: dict[str, object] = {}  # by the config less its datasets: loading Qwen3's costs seconds


def fingerprint_at_random() -> None:
    """datasets names each map's result by hashing its function, axolotl's tokenizer inside it: dill-pickling
    a 150k-token vocabulary was ~90% of this side's time (cProfile: 146 s of 166 s over 51 cases). Each
    map here runs once on fresh rows, so a random fingerprint (datasets' own fallback when a transform cannot
    be hashed) names it instead, with caching off so no result is looked up or kept under that name."""
    import datasets
    import datasets.arrow_dataset
    import datasets.fingerprint

    def random_fingerprint(fingerprint, transform, transform_args) -> str:
        return datasets.fingerprint.generate_random_fingerprint()

    datasets.disable_caching()
    datasets.fingerprint.update_fingerprint = random_fingerprint  # filter, select, ... (fingerprint_transform)
    datasets.arrow_dataset.update_fingerprint = random_fingerprint  # map


def run(job: dict, work: str) -> dict:
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.data.sft import _load_and_process_single_dataset
    from axolotl.utils.dict import DictDefault

    config = {
        "output_dir": os.path.join(work, "out"),
        "dataset_prepared_path": os.path.join(work, "prepared"),
        "micro_batch_size": 1,
        "num_epochs": 1,
        "learning_rate": 1e-4,
        "val_set_size": 0,
        "shuffle_merged_datasets": False,
        "shuffle_before_merging_datasets": False,
        "gradient_accumulation_steps": 1,
        "dataset_num_proc": 0,  # datasets runs map in this process (1 would still start a worker pool)
        **job["config"],
    }
    cfg = load_cfg(DictDefault(config))
    key = json.dumps({k: v for k, v in job["config"].items() if k != "datasets"}, sort_keys=True)
    if key not in TOKENIZERS:
        TOKENIZERS[key] = load_tokenizer(cfg)
    train, _ = _load_and_process_single_dataset(
        cfg.datasets[0], cfg, TOKENIZERS[key], split="train", seed=cfg.seed or 42
    )
    return {
        "input_ids": [list(map(int, r)) for r in train["input_ids"]],
        "labels": [list(map(int, r)) for r in train["labels"]],
    }


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    fingerprint_at_random()
    out = {}
    for n, job in enumerate(jobs):
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as work:
            cwd = os.getcwd()
            os.chdir(work)
            try:
                out[job["name"]] = run(job, work)
            except Exception as e:  # one job's failure is that job's result, not the suite's
                out[job["name"]] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            finally:
                os.chdir(cwd)
        print(f"[{n + 1}/{len(jobs)}] {job['name']}: {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
