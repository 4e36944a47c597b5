"""GRPO's pieces against plain-PyTorch formulas on small tensors, the built-in rewards, and the
direction of one update on a tiny model (the rewarded completion becomes more likely)."""

from __future__ import annotations

import pytest
import torch

from schemas.config import TrainingConfig
from schemas.rl import BUILTIN_REWARDS, TrlConfig
from worker.train.grpo import (
    Rollout,
    completion_logps,
    decode_answers,
    group_advantages,
    left_aligned,
    policy_loss,
    rollout_of,
)
from worker.train.rewards import REWARDS, Rewards


def test_every_builtin_the_schema_names_exists():
    assert set(BUILTIN_REWARDS) == set(REWARDS)


def test_builtin_rewards():
    cfg = TrainingConfig(
        base_model="m",
        learning_rate=1e-4,
        adapter="lora",
        rl="grpo",
        trl={"reward_funcs": ["exact_match", "contains_answer", "regex_format", "length"], "max_completion_length": 10},
    )
    ids = [[1] * 4, [1] * 6, [1] * 10]
    got = Rewards(cfg, {})(["p"] * 3, [" 4 8 2", "so 4 8 2!", "abc"], ids, ["4 8 2", "4 8 2", "4 8 2"])
    assert got == {
        "exact_match": [1.0, 0.0, 0.0],
        "contains_answer": [1.0, 1.0, 0.0],
        "regex_format": [1.0, 0.0, 0.0],
        "length": [-0.4, -0.6, -1.0],
    }
    custom = cfg.model_copy(update={"trl": cfg.trl.model_copy(update={"reward_regex": r"[a-c]+"})})
    assert Rewards(custom, {})(["p", "p"], ["abc", "4"], [[1], [1]], ["", ""])["regex_format"] == [1.0, 0.0]


def test_group_advantages_are_normalised_per_prompt():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 5.0, 3.0])
    a = group_advantages(r, 4, scale=True)
    for k in (0, 4):
        g = r[k : k + 4]
        assert torch.allclose(a[k : k + 4], (g - g.mean()) / (g.std() + 1e-4))
    assert torch.allclose(group_advantages(r, 4, scale=False), torch.cat([r[:4] - r[:4].mean(), r[4:] - r[4:].mean()]))
    assert torch.all(
        group_advantages(torch.ones(4), 4, scale=True) == 0
    )  # no signal where every completion scores the same


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_policy_loss_matches_the_formula(loss_type):
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 5, generator=g) - 2
    old = logp + 0.3 * torch.randn(4, 5, generator=g)  # a ratio away from 1, so the clip bites
    ref = logp + 0.2 * torch.randn(4, 5, generator=g)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    trl = TrlConfig(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, max_completion_length=5)
    loss, kl = policy_loss(logp, old, ref, adv, mask, trl, beta=0.04)
    per_token = torch.zeros(4, 5)
    kls = []
    for i in range(4):
        for t in range(5):
            rho = float(torch.exp(logp[i, t] - old[i, t]))
            a = float(adv[i])
            surrogate = min(rho * a, min(max(rho, 0.8), 1.28) * a)
            d = float(ref[i, t] - logp[i, t])
            k3 = pow(2.718281828459045, d) - d - 1
            per_token[i, t] = -surrogate + 0.04 * k3
            if mask[i, t]:
                kls.append(k3)
    m = mask.float()
    want = {
        "grpo": ((per_token * m).sum(1) / m.sum(1)).mean(),
        "bnpo": (per_token * m).sum() / m.sum(),
        "dr_grpo": (per_token * m).sum() / (4 * 5),
    }[loss_type]
    assert torch.isclose(loss, want, rtol=1e-5)
    assert abs(float(kl) - sum(kls) / len(kls)) < 1e-5


def test_left_alignment_and_answers_round_trip():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    left, left_mask = left_aligned(ids, mask, pad_id=0)
    assert left.tolist() == [[5, 6, 7], [0, 8, 9]] and left_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert decode_answers(torch.tensor([[52, 50, -1], [195, 169, -1]])) == ["42", "é"]


def test_a_rollout_joins_left_padded_prompts_and_right_padded_completions():
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    eos = 2
    completions = [[30, 2], [31, 32, 33], [40], [41, 2]]  # two per prompt; the second and third never ended
    for drop in (False, True):
        r = rollout_of(ids, mask, completions, 2, eos, pad_id=0, mask_truncated=drop)
        assert r.prompt_width == 3
        assert r.input_ids.tolist() == [
            [5, 6, 7, 30, 2, 0],
            [5, 6, 7, 31, 32, 33],
            [0, 8, 9, 40, 0, 0],
            [0, 8, 9, 41, 2, 0],
        ]
        ended = [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
        want = [row if not drop or c[-1] == eos else [0, 0, 0] for row, c in zip(ended, completions)]
        assert r.completion_mask.tolist() == want
        assert r.attention_mask.tolist() == [p + w for p, w in zip([[1, 1, 1]] * 2 + [[0, 1, 1]] * 2, want)]


def test_one_update_makes_the_rewarded_completion_more_likely(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    prompt = [11, 12, 13, 14]
    ids = torch.tensor([prompt + [t, t + 1] for t in (40, 50, 60, 70)])
    rollout = Rollout(ids, torch.ones_like(ids), torch.ones(4, 2, dtype=torch.long), len(prompt))
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale=True)
    trl = TrlConfig(max_completion_length=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = completion_logps(model, rollout).sum(1).detach()
    logp = completion_logps(model, rollout)
    loss, _ = policy_loss(logp, logp.detach(), None, advantages, rollout.completion_mask, trl, beta=0.0)
    loss.backward()
    optimizer.step()
    after = completion_logps(model, rollout).sum(1).detach()
    change = after - before
    assert change[0] > 0 and change[0] > change[1:].max() and change[1:].mean() < 0


def test_user_reward_functions_load_behind_the_gate_and_fail_clearly(tmp_path):
    from worker.errors import JobSpecError, TrainingError

    (tmp_path / "mine.py").write_text(
        "def half(prompts, completions, completion_ids, answer, **kw):\n"
        "    return [None if c == 'skip' else len(i) / 2 for c, i in zip(completions, completion_ids)]\n"
        "def boom(**kw):\n    raise KeyError('x')\n"
        "def short(completions, **kw):\n    return [1.0]\n"
    )
    cfg = TrainingConfig(
        base_model="m",
        learning_rate=1e-4,
        adapter="lora",
        rl="grpo",
        trl={"reward_funcs": ["exact_match", "mine.half"]},
    )
    allowed = {"BASE_VOLUME": str(tmp_path), "FTW_ALLOW_PLUGINS": "1"}
    got = Rewards(cfg, allowed)(["p", "p"], ["4", "skip"], [[7, 8], [9]], ["4", "4"])
    assert got["exact_match"] == [1.0, 0.0]
    assert got["mine.half"][0] == 1.0 and got["mine.half"][1] != got["mine.half"][1]  # None → NaN
    with pytest.raises(JobSpecError, match="FTW_ALLOW_PLUGINS=1"):
        Rewards(cfg, {"BASE_VOLUME": str(tmp_path)})
    with pytest.raises(JobSpecError, match="no function 'nope'"):
        Rewards(cfg.model_copy(update={"trl": TrlConfig(reward_funcs=["mine.nope"])}), allowed)
    with pytest.raises(TrainingError, match="reward function mine.boom raised KeyError"):
        Rewards(cfg.model_copy(update={"trl": TrlConfig(reward_funcs=["mine.boom"])}), allowed)(
            ["p"], ["c"], [[1]], ["a"]
        )
    with pytest.raises(TrainingError, match="must return 2 numbers"):
        Rewards(cfg.model_copy(update={"trl": TrlConfig(reward_funcs=["mine.short"])}), allowed)(
            ["p", "p"], ["c", "d"], [[1], [2]], ["a", "a"]
        )


def test_the_engine_settings_follow_the_training_config(tmp_path):
    from worker.train.sampling import VllmOptions
    from worker.train.vllm_generation import engine_settings

    cfg = TrainingConfig(
        base_model=str(tmp_path),
        learning_rate=1e-4,
        adapter="lora",
        lora_r=24,
        sequence_len=512,
        seed=7,
        rl="grpo",
        trl={"reward_funcs": ["exact_match"], "use_vllm": True, "max_completion_length": 128},
    )
    options = VllmOptions(sync_interval=1, gpu_memory_utilization=0.4, max_tokens=128)
    env = {"FTW_VLLM_PYTHON": "/opt/vllm/bin/python", "VLLM_EXTRA_ARGS": "--enforce-eager"}
    gpu = engine_settings(cfg, options, "bfloat16", env, on_gpu=True)
    assert (gpu.model, gpu.python, gpu.dtype, gpu.seed) == (str(tmp_path), "/opt/vllm/bin/python", "bfloat16", 7)
    assert gpu.max_lora_rank == 32 and gpu.max_model_len == 640 and gpu.gpu_memory_utilization == 0.4
    assert gpu.enable_lora and gpu.vllm_extra_args == ("--enforce-eager",)
    assert engine_settings(cfg, options, "bfloat16", env, on_gpu=False).gpu_memory_utilization is None
    hub = cfg.model_copy(update={"base_model": "org/model", "revision_of_model": "abc123"})
    assert engine_settings(hub, options, "bfloat16", {}, on_gpu=True).vllm_extra_args == ("--revision", "abc123")
