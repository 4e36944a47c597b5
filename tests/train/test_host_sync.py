"""A training step reads nothing back from the device: the varlen attention's segment boundaries
come with the batch (computed on the host from its CPU copy as it is read), and neither transformers'
mask code nor the attention looks at the batch's data. Counted with the torch profiler on CPU:
the ops that would block the host on a GPU (`aten::_local_scalar_dense` behind `.item()` and
`bool(tensor)`, `aten::nonzero`, reductions read as a bool). CPU has no flash kernel, so torch's
`varlen_attn` is stood in for by an exact CPU one that itself reads nothing back; on a GPU the
same property is asserted with CUDA's sync debug mode (tests/kernels/test_gpu.py)."""

from __future__ import annotations

import collections
import gc
import json

import pytest
import torch

from tests.train.helpers import pack
from worker.train.batches import BatchPlan, StepBatches

# `all`/`any`: transformers' mask code turns their result into a Python bool (on CPU that read is
# not an op of its own)
SYNCING_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::all", "aten::any")


def cpu_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch's varlen_attn semantics (causal segments of the flattened batch, grouped kv heads) in plain ops."""
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    n = q.shape[0]
    token = torch.arange(n)
    segment = torch.searchsorted(cu_q[1:].long(), token, right=True)  # no host read
    allowed = (segment[:, None] == segment[None, :]) & (token[None, :] <= token[:, None])
    scores = torch.einsum("qhd,khd->hqk", q, k) * (scale or q.shape[-1] ** -0.5)
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def syncing_ops(fn) -> collections.Counter:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.name in SYNCING_OPS)


@pytest.fixture
def varlen_model(task_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from ftw_kernels import attention

    monkeypatch.setattr(attention, "varlen_attn_fn", lambda: cpu_varlen_attn)
    attention.register()
    return AutoModelForCausalLM.from_pretrained(task_model_dir, attn_implementation="sdpa")


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_a_step_with_host_segments_reads_nothing_back(varlen_model, task_rows, packed):
    from datasets import Dataset

    from ftw_kernels import attention

    train, _, _ = task_rows
    rows = pack(train[:24], 64) if packed else train[:8]
    ds = Dataset.from_list(rows)
    plan = BatchPlan(len(rows), 1 if packed else 4, 1, 1, seed=0)
    batches = StepBatches(ds, plan, 0, 0, packed, range(1), torch.device("cpu"), varlen=True)
    try:
        batch = batches.get(0)
    finally:
        batches.close()
    micro = batch.micro[0]
    assert micro["max_length_q"] == int(micro["cu_seq_lens_q"].diff().max())
    # the same micro-batch as collate builds it for every other attention: no boundaries given
    without = {
        k: v for k, v in micro.items() if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    }
    if packed:
        without.pop("attention_mask")
    varlen_model.set_attn_implementation(attention.NAME)

    def step(inputs):  # fresh tensors, as every step has (the device path caches by identity)
        return lambda: varlen_model(
            **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        ).loss.backward()

    # the boundaries found on the device (one read-back per forward) give the same loss
    assert torch.equal(varlen_model(**micro).loss, varlen_model(**without).loss)
    assert syncing_ops(step(micro)) == collections.Counter()
    assert syncing_ops(step(without))  # what the host-computed boundaries save


def test_a_dpo_step_with_host_segments_reads_nothing_back(varlen_model):
    """The DPO family's two forwards (reference and policy) take the host-computed segments too, and
    the number of sequences comes from their shape: the step reads nothing back. Without them
    every forward finds the boundaries on the device."""
    from peft import LoraConfig, get_peft_model

    from ftw_kernels import attention
    from tests.train.test_preference_loss import config, packed, sequences
    from worker.train.preference import PreferenceObjective

    model = get_peft_model(varlen_model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.base_model.model.set_attn_implementation(attention.NAME)
    objective = PreferenceObjective(config("dpo"), model)
    without = packed(sequences(3, 6, model.config.vocab_size))
    micro = without | attention.host_segments(without["position_ids"], None)
    n_items = torch.tensor(float(objective.count(micro)))

    def step(batch):
        return lambda: objective.loss(model, batch, n_items)[0].backward()

    assert torch.equal(objective.loss(model, micro, n_items)[0], objective.loss(model, without, n_items)[0])
    assert syncing_ops(step(micro)) == collections.Counter()
    assert syncing_ops(step(without))


def test_the_steps_run_with_the_loaded_heap_out_of_the_collectors_view(
    task_model_dir, task_rows, tmp_path, monkeypatch
):
    """A full collection walks every object alive, and after the imports and the model that is hundreds of
    thousands: on an 8B model such a pause drained the GPU's queue (a step of 629 ms among ~470,
    docs/benchmarks.md). The trainer collects once and freezes what is alive before its loop, so the steps'
    collections walk only what the steps allocate."""
    from tests.train.helpers import base_config, run_inprocess, write_cache
    from worker.train.trainer import Trainer

    train, _, _ = task_rows
    cache = write_cache(tmp_path / "cache", train[:16], packed=False)
    queue_step, seen = Trainer.train_step, []

    def observed_step(self, batch):
        seen.append((gc.get_freeze_count(), any(obj is self.engine for obj in gc.get_objects())))
        return queue_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", observed_step)
    before = gc.get_freeze_count()
    assert run_inprocess(base_config(task_model_dir, max_steps=2, save_strategy="no"), tmp_path / "run", cache) == 0
    assert len(seen) == 2
    assert all(count > before + 10_000 and not model_in_view for count, model_in_view in seen), seen
    assert (
        gc.get_freeze_count() == 0
    )  # after the loop they are collectable again: a later run in this process frees them


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run through the device tool)")
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_a_cuda_training_step_never_waits_for_the_device(task_model_dir, task_rows, tmp_path, monkeypatch, packed):
    """The real trainer with the real kernels: after the first step (lazy initialisation, Triton
    compiles), queuing a step — copies, forward, backward, clipping, optimizer — raises on any
    synchronising CUDA call. Reading a step's numbers back (one step later) is not part of it."""
    from tests.train.helpers import base_config, run_inprocess, write_cache
    from worker.train.trainer import Trainer

    train, _, _ = task_rows
    cache = write_cache(tmp_path / "cache", pack(train[:96], 64) if packed else train[:48], packed=packed)
    queue_step, kernels = Trainer.train_step, []

    def strict_step(self, batch):
        kernels.append(self.kernels)
        torch.cuda.set_sync_debug_mode("error" if batch.step > 0 else "default")
        try:
            return queue_step(self, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "train_step", strict_step)
    cfg = base_config(
        task_model_dir,
        micro_batch_size=1 if packed else 4,
        gradient_accumulation_steps=2,
        max_steps=4,
        save_strategy="no",
        optimizer="adamw_torch_fused",
    )
    assert run_inprocess(cfg, tmp_path / "run", cache) == 0
    assert len(kernels) == 4 and "varlen_attention" in kernels[0]
    # the unpacked rows ran padding-free, and the prompt-masked labels sent the loss head their target rows
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["padding_free"] is (not packed) and "fused_linear_cross_entropy" in kernels[0]
