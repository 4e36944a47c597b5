"""A micro-batch of few tokens waits for the host: on the kernels' paths the host launches each decoder layer's
forward and backward (~6 ms a layer, measured on H100 hosts) while the GPU works, so a step is never shorter than
that, and the estimate says so where it binds, with what to change (docs/estimate.md; the calibration table's
`unpacked ~600` rows, which the estimate read 1.6× too fast without it)."""

from __future__ import annotations

from schemas.validate import validate_config
from tests.job.test_predicted_oom import CONFIG_8B
from worker.estimate.data_tokens import DatasetSize
from worker.estimate.gpus import gpu_table
from worker.estimate.model import (
    HOST_FORWARD_SHARE,
    gpu_seconds,
    host_bound,
    host_seconds,
    micro_batch_seconds,
    tokens_per_s,
)
from worker.estimate.report import estimate, workload_of
from worker.estimate.shapes import known_shape

H100 = gpu_table().find("NVIDIA H100 80GB HBM3")
SHORT = dict(sample_packing=False, micro_batch_size=1)  # one sample of ~600 tokens a micro-batch


def workload(**config):
    cfg = validate_config({**CONFIG_8B, **config}).value
    return workload_of(cfg, known_shape(cfg.base_model), DatasetSize(tokens=60_000_000, samples=100_000))


def test_a_short_micro_batch_takes_the_hosts_time_and_a_full_one_its_gpus():
    short, full = workload(**SHORT), workload()
    assert host_bound(short, H100.bf16_tflops) and not host_bound(full, H100.bf16_tflops)
    assert micro_batch_seconds(short, H100.bf16_tflops) == host_seconds(short) > gpu_seconds(short, H100.bf16_tflops)
    assert micro_batch_seconds(full, H100.bf16_tflops) == gpu_seconds(full, H100.bf16_tflops)
    # more samples a micro-batch cost no more host time: tokens/s grows with them until the GPU sets the pace
    assert tokens_per_s(workload(sample_packing=False, micro_batch_size=2), H100.bf16_tflops) > 1.9 * tokens_per_s(
        short, H100.bf16_tflops
    )


def test_checkpointing_launches_each_forward_again():
    short = workload(**SHORT)
    recomputed = workload(**SHORT, gradient_checkpointing=True)
    assert host_seconds(recomputed) == host_seconds(short) * (1 + HOST_FORWARD_SHARE)


def test_the_kernels_off_path_keeps_its_synced_host_time():
    off = workload(**SHORT, use_kernels=False)
    assert not host_bound(off, H100.bf16_tflops)
    assert micro_batch_seconds(off, H100.bf16_tflops) > gpu_seconds(off, H100.bf16_tflops)


def test_the_estimate_says_where_the_host_sets_the_pace_and_what_to_change():
    cfg = validate_config({**CONFIG_8B, **SHORT}).value
    notes = [n for n in estimate(cfg, {}, gpu_name="NVIDIA H100 80GB HBM3", tokens=60_000_000).notes if "host" in n]
    assert len(notes) == 1 and "NVIDIA H100 80GB HBM3" in notes[0]
    assert "micro_batch_size" in notes[0] and "sample_packing: true" in notes[0]
    assert "ran 1.2-1.8x slower than this" in notes[0]  # unpacked: what was measured beside the estimate
    assert "from 1.3-1.7x faster to 1.2x slower" in notes[0]  # and on hosts of one GPU type, faster and slower
    full = validate_config(CONFIG_8B).value
    assert not [n for n in estimate(full, {}, tokens=60_000_000).notes if "host sets the pace" in n]
    # packed already: more tokens come from the micro-batch's rows or their length
    small = validate_config({**CONFIG_8B, "micro_batch_size": 1, "sequence_len": 512}).value
    notes = [n for n in estimate(small, {}, gpu_name="NVIDIA H100 80GB HBM3", tokens=60_000_000).notes if "host" in n]
    assert len(notes) == 1 and "sequence_len" in notes[0] and "sample_packing" not in notes[0]
    assert "slower than this" not in notes[0]  # packed rows: no such measurement
