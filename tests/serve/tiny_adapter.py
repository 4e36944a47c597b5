"""Real LoRA adapters for the serving tests and bench: peft on a worker/devtools/tiny.py model, trained for real.

`train_tiny_adapter(base, out, text)` runs a few AdamW steps on one repeated text so the adapter's
greedy output differs from the base model's, then saves it as training publishes it: PEFT files,
the tokenizer, and the ftw manifest.json written last.
"""

from __future__ import annotations

from pathlib import Path


def train_tiny_adapter(base: Path, out: Path, text: str, steps: int = 30, rank: int = 8, seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.publish.manifest import Manifest

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, config)
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": text}]
    ids = torch.tensor([tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]])
    # lr 3e-2 collapsed both adapters to one repeated token on some CPUs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Manifest.of_folder(out).write(out)
    return out
