"""Activation offloading (worker/train/offload.py) changes where saved tensors wait, never a number.

The CUDA side stream cannot run here; its stand-in `QueuedCopies` behaves like one: a copy happens
only when something waits on it (or on a later copy), in issue order, and a fetched tensor holds
NaN until then, so a tensor read before its copy was waited for shows up in the gradients.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import weakref

import pytest
import torch

from tests.conftest import randomise_lora_b
from tests.train.helpers import base_config, cpu_lora_model, run_inprocess
from worker.train.offload import ActivationOffloader, HostCopies

CPU = torch.device("cpu")


class RecordingCopies(HostCopies):
    """Immediate copies that remember what went out."""

    def __init__(self):
        self.sent: list[torch.Tensor] = []

    def to_host(self, src, dst):
        self.sent.append(src)
        super().to_host(src, dst)


class QueuedCopies(HostCopies):
    """A CUDA side stream played on the CPU (see the module docstring)."""

    def __init__(self):
        self.queue, self.done, self.log = [], 0, []

    def _enqueue(self, dst, copy) -> int:
        if dst.is_floating_point():
            dst.fill_(float("nan"))  # what the memory holds until the copy really ran
        self.queue.append(copy)
        return len(self.queue)

    def to_host(self, src, dst):
        self._enqueue(dst, lambda: dst.copy_(src))

    def to_device(self, src, dst):
        token = self._enqueue(dst, lambda: dst.copy_(src))
        self.log.append(("fetch", token))
        return token

    def wait(self, token):
        if token is not None:
            self.log.append(("wait", token))
            while self.done < token:
                self.queue[self.done]()
                self.done += 1


def batch_of(model, rows: int = 2, length: int = 32) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone()}


def loss_and_grads(model, batch, offloader: ActivationOffloader | None):
    model.zero_grad(set_to_none=True)
    with offloader.saving() if offloader else contextlib.nullcontext():
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_gradients_are_exactly_those_without_offloading(four_layer_model_dir, checkpointing):
    model = cpu_lora_model(four_layer_model_dir, gradient_checkpointing=checkpointing)
    batch = batch_of(model)
    ref_loss, ref = loss_and_grads(model, batch, None)
    for offloader in (ActivationOffloader(CPU), ActivationOffloader(CPU, min_bytes=1, keep_last=0, prefetch=3)):
        loss, grads = loss_and_grads(model, batch, offloader)
        assert offloader.last.offloaded_tensors > 0
        assert torch.equal(loss, ref_loss)
        for name, g in ref.items():
            assert torch.equal(grads[name], g), name


def test_with_checkpointing_each_layer_input_goes_to_host_and_little_else(four_layer_model_dir):
    sent = {}
    for checkpointing in (False, True):
        layer_inputs = []  # forward's, then the recomputation's
        model = cpu_lora_model(four_layer_model_dir, gradient_checkpointing=checkpointing)
        copies = RecordingCopies()
        offloader = ActivationOffloader(CPU, keep_last=0, copies=copies)
        layers = model.get_base_model().model.layers
        record = layer_inputs.append  # this pass's list (the hooks are removed before the next)
        hooks = [layer.register_forward_pre_hook(lambda _, args, record=record: record(args[0])) for layer in layers]
        loss_and_grads(model, batch_of(model), offloader)
        for hook in hooks:
            hook.remove()
        sent[checkpointing] = {t.untyped_storage().data_ptr() for t in copies.sent}
    # with checkpointing the hooks see the inputs torch.utils.checkpoint saves, one a layer, and
    # outside the layers only the final norm's and the head's few
    assert {t.untyped_storage().data_ptr() for t in layer_inputs[: len(layers)]} <= sent[True]
    assert len(sent[True]) <= len(layers) + 3
    assert len(sent[False]) > 4 * len(sent[True])


def test_parameters_their_views_and_small_tensors_stay(four_layer_model_dir):
    model = cpu_lora_model(four_layer_model_dir)
    copies = RecordingCopies()
    offloader = ActivationOffloader(CPU, min_bytes=4096, keep_last=0, copies=copies)
    loss_and_grads(model, batch_of(model), offloader)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert copies.sent and all(t.untyped_storage().data_ptr() not in weights for t in copies.sent)
    assert all(t.numel() * t.element_size() >= 4096 for t in copies.sent)


def test_a_tensor_saved_by_several_ops_goes_once():
    x = torch.randn(64, 64, requires_grad=True)
    w1, w2 = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64, 64))
    grads = []
    for offloader in (None, ActivationOffloader(CPU, min_bytes=1, keep_last=0)):
        x.grad = w1.grad = None
        with offloader.saving() if offloader else contextlib.nullcontext() as stats:
            h = torch.tanh(x)  # saved by tanh (its output) and by both matmuls (with w1, w2: parameters)
            loss = (h @ w1).sum() + (h @ w2).sum()
        loss.backward()
        grads.append((x.grad, w1.grad))
    assert stats.offloaded_tensors == 1 and stats.deduplicated == 2
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_backward_waits_for_every_copy_and_fetches_ahead(four_layer_model_dir, checkpointing):
    model = cpu_lora_model(four_layer_model_dir, gradient_checkpointing=checkpointing)
    batch = batch_of(model)
    ref_loss, ref = loss_and_grads(model, batch, None)
    copies = QueuedCopies()
    loss, grads = loss_and_grads(model, batch, ActivationOffloader(CPU, keep_last=1, prefetch=1, copies=copies))
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], g) for n, g in ref.items())  # no NaN was read
    fetched = [token for op, token in copies.log if op == "fetch"]
    assert len(fetched) >= model.config.num_hidden_layers
    if checkpointing:
        # layer by layer: when backward waits for a layer's input, the copy of the next layer's is
        # already queued (it travels while this layer recomputes and runs its backward)
        for i, (op, token) in enumerate(copies.log):
            if op == "wait" and token != fetched[-1]:
                assert ("fetch", token + 1) in copies.log[:i], copies.log


def test_host_buffers_are_reused_from_step_to_step_and_return_when_a_graph_is_dropped(four_layer_model_dir):
    model = cpu_lora_model(four_layer_model_dir, gradient_checkpointing=True)
    batch = batch_of(model)
    offloader = ActivationOffloader(CPU, keep_last=0)
    loss_and_grads(model, batch, offloader)
    held = offloader.pool.held_bytes
    assert held >= offloader.last.offloaded_bytes > 0
    loss_and_grads(model, batch, offloader)
    assert offloader.pool.held_bytes == held  # nothing new allocated

    with offloader.saving():
        out = model(**batch).loss
    ref = weakref.ref(out)
    del out  # no backward: the graph and what it saved must go
    gc.collect()
    assert ref() is None
    assert sum(b.numel() for bufs in offloader.pool.free.values() for b in bufs) == held


@pytest.mark.parametrize(
    "memory",
    [{"activation_offloading": True}, {"gradient_checkpointing": "offload"}],
    ids=["offload", "checkpointing-offload"],
)
def test_training_with_offloading_reaches_the_same_losses(task_model_dir, small_cache, tmp_path, caplog, memory):
    reference = {"gradient_checkpointing": True} if memory.get("gradient_checkpointing") else {}
    summaries = {}
    for name, over in (("reference", reference), ("offloaded", memory)):
        cfg = base_config(task_model_dir, max_steps=3, save_strategy="no", **over)
        with caplog.at_level(logging.INFO, logger="ftw.train"):
            assert run_inprocess(cfg, tmp_path / name, small_cache) == 0
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    losses = [s["loss_curve"] for s in summaries.values()]
    assert losses[0] == losses[1] and losses[0][0][1] > losses[0][-1][1]  # it trains, and identically
    offloaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("activation offloading:")]
    assert len(offloaded) == 1 and not offloaded[0].startswith("activation offloading: 0 ")


# ---- on a GPU (run through the device tool; skipped on CPU): the real side stream --------------
def cuda_lora_model(kernels: bool):
    """A random-init Llama of modest shape in bf16 with checkpointing and LoRA, as ftw builds it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    randomise_lora_b(model, std=0.02)
    if kernels:
        from ftw_kernels import apply_kernels
        from schemas.config import TrainingConfig

        assert apply_kernels(
            model,
            TrainingConfig(
                base_model="x",
                learning_rate=1e-4,
                adapter="lora",
                lora_r=16,
                lora_alpha=32,
                gradient_checkpointing=True,
            ),
        )
    return model.train()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernels", [False, True], ids=["hf", "ftw-kernels"])
def test_on_cuda_gradients_match_and_the_layer_inputs_leave_the_gpu(kernels):
    model = cuda_lora_model(kernels)
    ids = torch.randint(0, 32000, (4, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    layer_input = ids.numel() * 1024 * 2

    def measured(offloader):
        loss_and_grads(model, batch, offloader)  # warm: kernels compiled, host buffers pinned
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, grads = loss_and_grads(model, batch, offloader)
        torch.cuda.synchronize()
        return loss, grads, torch.cuda.max_memory_allocated() - base

    ref_loss, ref, ref_peak = measured(None)
    again_loss, again, _ = measured(None)
    offloader = ActivationOffloader(torch.device("cuda"))
    loss, grads, peak = measured(offloader)
    # as close as the reference is to itself (flash attention's backward is not bit-reproducible);
    # a tensor read before its copy landed would be another layer's or garbage, far outside this
    for name, g in ref.items():
        noise = (again[name].float() - g.float()).abs().max()
        assert (grads[name].float() - g.float()).abs().max() <= max(2 * noise, 1e-2 * g.float().abs().max()), name
    assert (loss - ref_loss).abs() <= max(2 * (again_loss - ref_loss).abs(), 1e-3)
    assert offloader.last.offloaded_bytes >= 6 * layer_input  # 8 layer inputs, but the last kept
    # the GPU no longer holds the layer inputs at the peak: all but about three of them are gone
    assert ref_peak - peak >= 4 * layer_input, (ref_peak / 2**20, peak / 2**20)
