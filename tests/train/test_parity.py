"""One optimizer step of ftw's loop against a plain transformers + peft reference (fp32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.helpers import adapter_tensors, base_config, run_inprocess, write_cache


def reference_step(model_dir, rows, cfg):
    """The textbook loop: padded batch, mean loss, backward, clip, SGD.

    SGD, not AdamW: Adam's first step moves every element by ±lr whatever the gradient's size, so
    a gradient element within rounding of zero (whose sign differs between CPUs' matmul kernels)
    would flip a whole ±lr; SGD's update is the clipped gradient itself, compared with a tolerance."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_cache=False)
    names = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], target_modules=names, lora_dropout=0.0, task_type="CAUSAL_LM"
        ),
    )
    model.train()
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
    opt = torch.optim.SGD(params, lr=cfg["learning_rate"])
    opt.step()
    from peft import get_peft_model_state_dict

    return loss.detach().item(), {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize(
    "memory",
    [{}, {"gradient_checkpointing": True, "activation_offloading": True}],
    ids=["plain", "checkpointing+offload"],
)
def test_one_step_matches_transformers_peft_reference(task_model_dir, task_rows, tmp_path, memory):
    """Gradient checkpointing and activation offload trade time for memory and change no number."""
    train, _, _ = task_rows
    rows = train[:4]  # exactly one global batch: the step's rows do not depend on the order
    cache = write_cache(tmp_path / "cache", rows)
    cfg = base_config(
        task_model_dir,
        micro_batch_size=4,
        max_steps=1,
        optimizer="sgd",
        learning_rate=1.0,
        max_grad_norm=1.0,
        save_strategy="no",
        **memory,
    )
    assert run_inprocess(cfg, tmp_path / "run", cache) == 0

    torch.set_num_threads(1)
    ref_loss, ref_weights = reference_step(task_model_dir, rows, cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["loss_curve"][0][1] == pytest.approx(ref_loss, rel=1e-4)

    ours = adapter_tensors(tmp_path / "run" / "adapter")
    assert set(ours) == set(ref_weights)
    for name, ref in ref_weights.items():
        torch.testing.assert_close(ours[name], ref, rtol=1e-4, atol=1e-6, msg=name)
    assert any(ref.abs().sum() > 0 for k, ref in ref_weights.items() if "lora_B" in k)  # the step moved B off zero


def test_early_stopping_ends_the_run_when_eval_loss_stops_improving(task_model_dir, task_rows, tmp_path):
    train, held, _ = task_rows
    cache = write_cache(tmp_path / "cache", train[:16], held[:4])
    # a learning rate too small to move the loss: every eval after the first fails to improve
    cfg = base_config(
        task_model_dir, max_steps=10, learning_rate=1e-12, eval_steps=1, early_stopping_patience=2, save_strategy="no"
    )
    assert run_inprocess(cfg, tmp_path / "run", cache) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["eval_curve"]) == 3
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_loss_watchdog_stops_a_run_whose_loss_stays_too_high(task_model_dir, task_rows, tmp_path):
    from worker.errors import TrainingError

    train, _, _ = task_rows
    cache = write_cache(tmp_path / "cache", train[:16])
    cfg = base_config(
        task_model_dir, max_steps=10, loss_watchdog_threshold=0.5, loss_watchdog_patience=2, save_strategy="no"
    )
    with pytest.raises(TrainingError, match="loss_watchdog_threshold") as e:
        run_inprocess(cfg, tmp_path / "run", cache)
    assert "step 2" in e.value.message
