"""Adapters: LoRA options reach peft, an adapter continued from lora_model_dir is applied once
(axolotl #2568 applied it twice), full fine-tuning trains and saves the whole model."""

from __future__ import annotations

import json

import pytest
import torch

from schemas.config import TrainingConfig
from tests.train.helpers import base_config, run_inprocess
from worker.train.adapters import attach, lora_config


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, use_cache=False)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_bf16_quantised_base_is_only_frozen(bits):
    """PEFT's k-bit preparation would cast the embeddings, norms and output layer of a bf16 base to fp32 (an fp32
    residual stream, twice the activations): a bf16 4-bit or 8-bit base is only frozen."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import quantise_linears_8bit
    from worker.train.adapters import prepare_quantized
    from worker.train.warmup import quantise_linears

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=97)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if bits == 4:
        quantise_linears(model, "nf4", True, torch.bfloat16)
    else:
        quantise_linears_8bit(model)
    keys = {"load_in_4bit": True, "adapter": "qlora"} if bits == 4 else {"load_in_8bit": True, "adapter": "lora"}
    train = TrainingConfig.model_validate({"base_model": "tiny", "learning_rate": 1e-3, **keys})
    prepared = prepare_quantized(model, train)
    assert not any(p.requires_grad for p in prepared.parameters())
    assert {p.dtype for p in prepared.parameters() if p.is_floating_point()} == {torch.bfloat16}


def test_lora_keys_reach_peft(task_model_dir):
    cfg = TrainingConfig.model_validate(
        base_config(
            task_model_dir,
            lora_r=4,
            lora_alpha=8,
            lora_dropout=0.05,
            peft_use_dora=True,
            peft_use_rslora=True,
            lora_modules_to_save=["lm_head"],
            lora_target_linear=None,
            lora_target_modules=["q_proj", "v_proj"],
        )
    )
    lc = lora_config(cfg, load(task_model_dir))
    assert (lc.r, lc.lora_alpha, lc.lora_dropout, lc.use_dora, lc.use_rslora) == (4, 8, 0.05, True, True)
    assert set(lc.target_modules) == {"q_proj", "v_proj"} and lc.modules_to_save == ["lm_head"]
    linear = lora_config(TrainingConfig.model_validate(base_config(task_model_dir)), load(task_model_dir))
    assert set(linear.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_adapter_from_lora_model_dir_is_applied_once_and_trainable(task_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    trained = get_peft_model(
        load(task_model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    trained.save_pretrained(tmp_path / "previous")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        base_logits = load(task_model_dir)(input_ids=ids).logits
        want = PeftModel.from_pretrained(load(task_model_dir), tmp_path / "previous").eval()(input_ids=ids).logits
    assert (want - base_logits).abs().max() > 1e-3  # the adapter changes the output

    cfg = TrainingConfig.model_validate(base_config(task_model_dir, lora_model_dir=str(tmp_path / "previous")))
    model = attach(load(task_model_dir), cfg).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert len(names) == 2 * 3 * 2  # A and B × 3 modules × 2 layers: one adapter, not two stacked


def test_full_finetune_trains_every_weight_and_saves_a_model(task_model_dir, task_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.train.helpers import write_cache

    train, _, _ = task_rows
    cache = write_cache(tmp_path / "cache", train[:8])
    cfg = base_config(
        task_model_dir, adapter=None, lora_target_linear=None, max_steps=2, learning_rate=1e-3, save_strategy="no"
    )
    assert run_inprocess(cfg, tmp_path / "run", cache) == 0
    out = tmp_path / "run" / "model"
    assert (
        (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    )
    before, after = load(task_model_dir).state_dict(), AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert (
        "model.embed_tokens.weight" in changed
        and "model.layers.0.mlp.down_proj.weight" in changed
        and "lm_head.weight" in changed
    )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["adapter"] == "full"


def test_added_tokens_resize_embeddings_and_must_train_them(task_model_dir):
    from worker.data.tokenizer import load_tokenizer
    from worker.errors import JobSpecError
    from worker.train.model import load_model, resolve_precision

    cpu = torch.device("cpu")
    keys = dict(tokens=["<tool_call>", "</tool_call>"], special_tokens={"additional_special_tokens": ["<think>"]})
    cfg = TrainingConfig.model_validate(base_config(task_model_dir, **keys))
    tok = load_tokenizer(cfg)
    before = load(task_model_dir).get_input_embeddings().weight.shape[0]
    assert (
        len(tok) == before + 3
        and tok.convert_tokens_to_ids("<think>") >= before
        and len(tok.tokenize("<tool_call>")) == 1
    )
    with pytest.raises(JobSpecError, match="untrained") as e:
        load_model(cfg, tok, resolve_precision(cfg, cpu), cpu)
    assert "lora_modules_to_save" in e.value.hint
    cfg = TrainingConfig.model_validate(
        base_config(
            task_model_dir,
            lora_modules_to_save=["embed_tokens", "lm_head"],
            resize_token_embeddings_to_32x=True,
            **keys,
        )
    )
    model = load_model(cfg, load_tokenizer(cfg), resolve_precision(cfg, cpu), cpu)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tok) and rows % 32 == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_bf16_4bit_base_stays_bf16(dtype: torch.dtype) -> None:
    """QLoRA under bf16: the non-4-bit weights (embeddings, norms, output layer) stay bf16, so the
    residual stream and the activations kept for backward do too (PEFT's kbit preparation casts them
    to fp32: 2× the memory); an fp16 base keeps that preparation (fp16 needs the fp32 norms)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.kernels.test_qlora import qlora_config
    from worker.train.warmup import quantise_linears

    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    quantise_linears(model, "nf4", True, dtype)
    model = attach(model, qlora_config(base_model="/m", datasets=[{"path": "d.jsonl", "type": "completion"}]))
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all("lora_" in n for n in trains)
    kept = {p.dtype for n, p in model.named_parameters() if "norm" in n or "embed" in n}
    assert kept == ({torch.bfloat16} if dtype == torch.bfloat16 else {torch.float32})
