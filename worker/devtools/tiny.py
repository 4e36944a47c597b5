"""Tiny base models and tokenizers built locally: the demo's model and the tests' (no Hub here).

    python -m worker.devtools.tiny OUT_DIR [--style chatml|llama3] [--hidden 128] [--layers 2] [--arch llama|qwen3_moe]

The tokenizer is a byte-level BPE trained on a small built-in corpus plus any text given, with a
real chat template of the chosen style, so every code path that loads a Hub model (AutoTokenizer,
AutoModelForCausalLM, vLLM) runs unchanged on the folder. head_dim is 32 (vLLM's CPU minimum).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
STYLES = {
    # style: (special tokens, bos, eos, pad, template)
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"], None, "<|im_end|>", "<pad>", CHATML_TEMPLATE),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<pad>",
        LLAMA3_TEMPLATE,
    ),
}
BASE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "system user assistant tool You are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ? !",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "reverse copy upper lower sort count answer question hello world",
]


def build_tokenizer(
    out_dir: str | Path, style: str = "chatml", extra_text: Iterable[str] = (), vocab_size: int = 512
) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, template = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*BASE_CORPUS, *extra_text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=None)
    fast.chat_template = template
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def build_model(
    out_dir: str | Path,
    style: str = "chatml",
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    max_positions: int = 2048,
    seed: int = 0,
    extra_text: Iterable[str] = (),
    initializer_range: float = 0.02,
    arch: str = "llama",
    experts: int = 8,
) -> Path:
    """A random-init model + tokenizer, saved as safetensors in `out_dir`: Llama, or Qwen3-MoE
    (`experts` experts of width intermediate/2, top-2, every layer sparse)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3MoeConfig

    out = Path(out_dir)
    build_tokenizer(out, style=style, extra_text=extra_text)
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(seed)
    moe = (
        {
            "num_experts": experts,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": intermediate // 2,
            "decoder_sparse_step": 1,
            "norm_topk_prob": True,
        }
        if arch == "qwen3_moe"
        else {}
    )
    config = (Qwen3MoeConfig if arch == "qwen3_moe" else LlamaConfig)(
        **moe,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
        initializer_range=initializer_range,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "ftw_tiny.json").write_text(
        json.dumps({"style": style, "hidden": hidden, "layers": layers, "seed": seed, "arch": arch})
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.devtools.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--style", choices=sorted(STYLES), default="chatml")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--arch", choices=["llama", "qwen3_moe"], default="llama")
    args = parser.parse_args(argv)
    print(build_model(args.out_dir, style=args.style, hidden=args.hidden, layers=args.layers, arch=args.arch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
