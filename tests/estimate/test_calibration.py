"""The estimate against every ftw training row measured on a GPU (docs/benchmarks.md's calibration table, read from
the document itself, so a row added there is checked here with no other change)."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from worker.estimate.calibration import CALIBRATION_HEADING, read_doc, read_rows
from worker.estimate.model import MEMORY_TOLERANCE, SPEED_TOLERANCE

ROWS = read_doc(REPO / "docs" / "benchmarks.md")


def test_the_table_is_read_whole():
    assert len(ROWS) >= 23
    assert {r.cells["method"] for r in ROWS} >= {"lora", "qlora"} and {r.cells["ckpt"] for r in ROWS} >= {
        "off",
        "offload",
    }
    assert all(r.tokens_per_s or r.peak_gib for r in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.label for r in ROWS])
def test_prediction_within_tolerance_of_the_measurement(row):
    speed, peak = row.predicted()
    for measured in row.peak_gib:
        assert abs(peak / measured - 1) <= MEMORY_TOLERANCE, f"peak {peak:.1f} GiB predicted, {measured} measured"
    for measured in row.tokens_per_s:
        assert abs(speed / measured - 1) <= SPEED_TOLERANCE, (
            f"{speed:,.0f} tokens/s predicted, {measured:,.0f} measured"
        )


def test_a_new_row_is_picked_up_and_a_wrong_one_fails():
    row = "| 2027-01-01 | {gpu} | a new run | Llama-3.1-8B | lora | on | 4 | 2048 | full | off | bare | 32,000 | 20.0 |"
    rows = with_row(row.format(gpu="NVIDIA H100 80GB HBM3"))
    assert len(rows) == len(ROWS) + 1
    speed, peak = rows[-1].predicted()
    assert abs(speed / 32000 - 1) > SPEED_TOLERANCE and abs(peak / 20.0 - 1) > MEMORY_TOLERANCE
    # the card's bf16 peak scales the prediction: an A100's 312 TFLOP/s against the H100's 989
    a100 = with_row(row.format(gpu="NVIDIA A100 80GB PCIe"))[-1].predicted()[0]
    assert abs(a100 / speed - 312 / 989.4) < 0.01
    with pytest.raises(ValueError, match="GPU 'a GPU nobody sells' is not in runpod_gpus.toml"):
        with_row(row.format(gpu="a GPU nobody sells"))[-1].predicted()


def with_row(row: str) -> list:
    """The document's rows with `row` added at the table's end."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    start = text.index("| date | gpu | source |", text.index(CALIBRATION_HEADING))
    table_end = text.index("\n\n", start)
    return read_rows(text[:table_end] + "\n" + row + text[table_end:])
