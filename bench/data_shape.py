"""What users' data shape is worth, before a GPU measures it: the estimate's prediction for prompt-masked tokens
(ftw's loss head computes the target rows only) and the padding an unpacked micro-batch holds (what padding-free
batches save).

    .venv/bin/python bench/data_shape.py                   # both tables, CPU only, in a second

Table 1, per model: the output head's share of a LoRA step's FLOPs (worker/estimate/model.py `flops_per_token`) and
the predicted tokens/s with half the tokens masked over all of them trained (`tokens_per_s`, kernels on, packed
rows of 2,048, the model's usual micro-batch). Table 2: the bench's unpacked stream (bench/models.py
`sample_lengths`: lognormal, mean ~600, ≤ 2,048) padded to each micro-batch's longest sample, over its real tokens.
Neither is a measurement: the calls in bench/gpu_step.sh (`masked`, `unpacked`) measure them.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.models import sample_lengths  # noqa: E402
from schemas.validate import validate_config  # noqa: E402
from worker.estimate.data_tokens import DatasetSize  # noqa: E402
from worker.estimate.model import flops_per_token, tokens_per_s  # noqa: E402
from worker.estimate.report import workload_of  # noqa: E402
from worker.estimate.shapes import known_shape  # noqa: E402

MODELS = {"meta-llama/Llama-3.2-1B": 8, "meta-llama/Llama-3.1-8B": 4, "Qwen/Qwen3-0.6B": 8, "Qwen/Qwen3-8B": 4}


def head_table(masked: float = 0.5) -> list[str]:
    rows = [
        f"| model | micro-batch | head's share of the FLOPs | predicted speed, {masked:.0%} masked / all trained |",
        "|---|---:|---:|---:|",
    ]
    for model, mbs in MODELS.items():
        shape = known_shape(model)
        assert shape is not None, model
        config = {
            "base_model": model,
            "datasets": [{"path": "org/chat", "type": "chat_template"}],
            "adapter": "lora",
            "lora_r": 16,
            "lora_target_linear": True,
            "sequence_len": 2048,
            "sample_packing": True,
            "micro_batch_size": mbs,
            "max_steps": 10,
            "learning_rate": 1e-4,
            "use_kernels": True,
        }
        cfg = validate_config(config).value
        all_trained = workload_of(cfg, shape, DatasetSize(tokens=10**8, samples=10**5))
        half = workload_of(cfg, shape, DatasetSize(tokens=10**8, samples=10**5, trained_share=1 - masked))
        share = 4 * shape.vocab * shape.hidden / flops_per_token(all_trained)
        rows.append(f"| {model} | {mbs} | {share:.1%} | {tokens_per_s(half) / tokens_per_s(all_trained):.3f}× |")
    return rows


def padding_table(micro_batches: int = 4000) -> list[str]:
    rows = ["| samples a micro-batch | padded tokens / real tokens |", "|---:|---:|"]
    for mbs in (2, 4, 8):
        lengths = sample_lengths(micro_batches * mbs, seed=0)
        padded = sum(max(lengths[i : i + mbs]) * mbs for i in range(0, len(lengths), mbs))
        rows.append(f"| {mbs} | {padded / sum(lengths):.2f} |")
    return rows


def main() -> int:
    print("\n".join(head_table()), end="\n\n")
    print("\n".join(padding_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
