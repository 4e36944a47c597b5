"""A padding-free run with gradient accumulation joins each step's samples across its micro-batches
(worker/train/batches.joined): fewer forward and backward passes a step, each of which the host takes the same time
to launch. The estimate counts the passes from the step's tokens at JOIN_FILL of micro_batch_size × sequence_len a
pass, and over several ranks the excess of the rank needing most (LOCKSTEP_SPREAD); here against the trainer's own
joining over lognormal samples (bench/joined_passes.py), and in a job's time."""

from __future__ import annotations

import pytest

from bench.joined_passes import passes
from bench.models import sample_lengths
from schemas.validate import validate_config
from tests.job.test_predicted_oom import CONFIG_8B
from worker.estimate.data_tokens import DatasetSize
from worker.estimate.gpus import gpu_table
from worker.estimate.model import step_seconds, tokens_per_s
from worker.estimate.report import estimate, workload_of
from worker.estimate.shapes import known_shape

H100 = gpu_table().find("NVIDIA H100 80GB HBM3")
UNPACKED = dict(sample_packing=False, micro_batch_size=1, gradient_accumulation_steps=8)


def workload(gpu_count: int = 1, **config):
    cfg = validate_config({**CONFIG_8B, **config}).value
    data = DatasetSize(tokens=60_000_000, samples=100_000)  # 600 tokens a sample
    return workload_of(cfg, known_shape(cfg.base_model), data, gpu_count)


@pytest.mark.parametrize("ranks", [1, 2, 8])
@pytest.mark.parametrize("mbs, accum", [(1, 4), (1, 8), (2, 4), (2, 8), (4, 4)])
def test_the_passes_counted_are_within_a_fifth_of_the_trainers_own(mbs, accum, ranks):
    """Over several ranks, the passes every rank runs: as many as the rank whose share needs most."""
    lengths = sample_lengths(5_000, seed=0, cap=2048)
    _, merged, _, lockstep = passes(lengths, mbs, accum, steps=200, ranks=ranks)
    exact = lockstep if ranks > 1 else sum(map(len, merged)) / len(merged)
    mean = sum(lengths) / len(lengths)
    w = workload(ranks, sample_packing=False, micro_batch_size=mbs, gradient_accumulation_steps=accum)
    w = w.replace(micro_tokens=mbs * mean)  # the bench's samples, not the config's data
    assert w.joined and exact < accum
    assert w.passes == pytest.approx(exact, rel=0.2)


def test_ranks_in_lockstep_run_more_passes_a_step_than_one_process():
    one, eight = workload(1, **UNPACKED), workload(8, **UNPACKED)
    assert one.passes < workload(2, **UNPACKED).passes < eight.passes <= 8
    assert tokens_per_s(eight, H100.bf16_tflops) < tokens_per_s(one, H100.bf16_tflops)  # a GPU's, host-bound


def test_a_joined_run_is_estimated_faster_and_its_cost_lower():
    joined = workload(**UNPACKED)
    assert joined.joined and 1 <= joined.passes < 8
    unjoined = joined.replace(joined=False)
    assert step_seconds(joined, H100.bf16_tflops) < step_seconds(unjoined, H100.bf16_tflops)
    assert tokens_per_s(joined, H100.bf16_tflops) > 1.5 * tokens_per_s(unjoined, H100.bf16_tflops)  # host-bound passes
    cfg = validate_config({**CONFIG_8B, **UNPACKED}).value
    (row,) = estimate(cfg, {}, gpu_name="NVIDIA H100 80GB HBM3", tokens=60_000_000).rows
    assert row.tokens_per_s == pytest.approx(tokens_per_s(joined, H100.bf16_tflops))


@pytest.mark.parametrize(
    "config, gpus",
    [
        ({"sample_packing": True}, 1),  # packing's bins are full already
        ({**UNPACKED, "gradient_accumulation_steps": 1}, 1),  # one micro-batch a step
        ({**UNPACKED, "deepspeed": "zero2"}, 2),  # DeepSpeed's engine counts a step's micro-batches itself
        ({**UNPACKED, "output_router_logits": True}, 1),  # the router's coefficient is shared per micro-batch
        ({**UNPACKED, "pad_to_sequence_len": True}, 1),  # padded rows, not padding-free
    ],
)
def test_runs_the_trainer_does_not_join_are_estimated_a_pass_a_micro_batch(config, gpus):
    w = workload(gpus, **config)
    assert not w.joined and w.passes == w.grad_accum


def test_the_estimate_joins_where_the_trainer_does():
    """One rule (TrainingConfig.joins_steps): DeepSpeed on one GPU trains without its engine, and joins; DDP and FSDP
    ranks join, each into as many passes as the rank that needs most."""
    assert workload(1, **UNPACKED, deepspeed="zero2").joined
    assert not workload(2, **UNPACKED, deepspeed="zero2").joined
    assert workload(2, **UNPACKED).joined and workload(4, **UNPACKED, fsdp_config={"fsdp_version": 2}).joined
