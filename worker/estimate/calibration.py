"""The measured rows the estimate is calibrated and checked on, read from docs/benchmarks.md.

Its section CALIBRATION_HEADING holds one table; each row is one measured run on one GPU:

    | date | gpu | source | model | method | kernels | mbs | seq | samples | ckpt | loop | tokens/s | peak GiB |

`gpu`: the card as nvidia-smi names it, one of worker/estimate/runpod_gpus.toml's (its bf16 peak scales the speed);
`samples`: `full` (every row one sample of `seq` tokens), `packed ~600` (packed samples of that
mean length) or `unpacked ~600` (`mbs` samples of that mean length a micro-batch, one a row: the kernels join them
into one row, padding-free); `ckpt`: off, on or offload; `loop`: bare (bench/train_throughput.py) or real
(`ftw train`, bench/gpu_train.py); figures may be a range (a–b) or — (not measured). A row added
to the table is checked by tests/estimate/test_calibration.py without any other change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from worker.estimate.gpus import TABLE, gpu_table
from worker.estimate.model import GiB, Workload, peak_bytes, tokens_per_s
from worker.estimate.shapes import LINEAR_MODULES, known_shape, lora_param_count

CALIBRATION_HEADING = "## Calibration rows of `ftw estimate`"
COLUMNS = (
    "date",
    "gpu",
    "source",
    "model",
    "method",
    "kernels",
    "mbs",
    "seq",
    "samples",
    "ckpt",
    "loop",
    "tokens/s",
    "peak GiB",
)
BENCH_LORA_R = 16  # every bench arm: LoRA r=16 on all seven linear layers


@dataclass(frozen=True)
class MeasuredRow:
    cells: dict[str, str]
    tokens_per_s: tuple[float, ...]  # every figure given (a range gives two)
    peak_gib: tuple[float, ...]

    @property
    def label(self) -> str:
        c = self.cells
        return (
            f"{c['model']} {c['method']} kernels {c['kernels']} mbs {c['mbs']} {c['samples']} ckpt {c['ckpt']} "
            f"{c['loop']} ({c['date']}, {c['gpu']})"
        )

    def workload(self) -> Workload:
        c = self.cells
        shape = known_shape(c["model"])
        if shape is None:
            raise ValueError(f"calibration row {self.label}: model {c['model']!r} is not in worker/estimate/shapes.py")
        packed = c["samples"].startswith("packed")
        mean = float(c["samples"].split("~")[1]) if "~" in c["samples"] else float(c["seq"])
        kernels = c["kernels"] == "on"
        method, _, options = c["method"].partition(",")  # e.g. "lora, dropout 0.05"
        return Workload(
            shape=shape,
            method=method,  # type: ignore[arg-type]
            kernels=kernels,
            micro_batch_size=int(c["mbs"]),
            sequence_len=int(c["seq"]),
            packed=packed,
            padding_free=kernels and c["samples"].startswith("unpacked"),
            checkpointing=c["ckpt"] != "off",
            offload=c["ckpt"] == "offload",
            lora_params=lora_param_count(shape, BENCH_LORA_R, LINEAR_MODULES),
            mean_sample_tokens=mean,
            dropout="dropout" in options,
        )

    def predicted(self) -> tuple[float, float]:
        """(tokens/s, peak GiB) the estimate gives for this row."""
        gpu = gpu_table().find(self.cells["gpu"])
        if gpu is None:
            raise ValueError(f"calibration row {self.label}: GPU {self.cells['gpu']!r} is not in {TABLE.name}")
        w = self.workload()
        return tokens_per_s(w, gpu.bf16_tflops), peak_bytes(w) / GiB


def figures(cell: str) -> tuple[float, ...]:
    return tuple(float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", cell))


def read_rows(text: str) -> list[MeasuredRow]:
    start = text.index(CALIBRATION_HEADING)
    section = text[start + len(CALIBRATION_HEADING) :]
    end = section.find("\n## ")
    section = section if end < 0 else section[:end]
    rows = []
    for line in section.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) != len(COLUMNS) or cells[0] == "date" or set(cells[0]) <= {"-", ":"}:
            continue
        row = dict(zip(COLUMNS, cells))
        rows.append(MeasuredRow(row, figures(row["tokens/s"]), figures(row["peak GiB"])))
    return rows


def read_doc(path: Path) -> list[MeasuredRow]:
    return read_rows(path.read_text(encoding="utf-8"))
