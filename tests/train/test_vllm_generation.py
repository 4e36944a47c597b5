"""GRPO's vLLM generator on the real vLLM (CPU build): one engine for the module, started by the generator as
training starts it. Its greedy completions match the policy's own (transformers + peft) token for token,
before and after a LoRA sync; a sync follows vllm_sync_interval; closing it ends the engine's processes."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

from schemas.config import TrainingConfig
from tests.conftest import randomise_lora_b
from tests.serve.conftest import ensure_vllm_env
from tests.train.vllm_helpers import engine_gone, group_members, vllm_env
from worker.train.generation import TransformersGenerator
from worker.train.sampling import Sampling, VllmOptions, cut_at_stop

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [[1, 40, 41, 42], [1, 50, 51]]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))


@pytest.fixture(scope="module")
def generator(tiny_model_dir, policy, tmp_path_factory) -> Iterator:
    from worker.train.vllm_generation import VllmGenerator

    cfg = TrainingConfig(
        base_model=str(tiny_model_dir),
        learning_rate=1e-4,
        adapter="lora",
        lora_r=8,
        sequence_len=64,
        rl="grpo",
        trl={"use_vllm": True, "vllm_sync_interval": 2, "reward_funcs": ["exact_match"]},
    )
    with pytest.MonkeyPatch.context() as mp:
        for k, v in vllm_env(ensure_vllm_env()).items():
            mp.setenv(k, v)
        gen = VllmGenerator(cfg, policy, tmp_path_factory.mktemp("run"), VllmOptions.from_trl(cfg.trl))
    yield gen
    gen.close()


def greedy() -> Sampling:
    return Sampling(n=1, max_tokens=MAX_TOKENS, temperature=0.0, stop_id=2)


def reference(policy, prompt: list[int]) -> list[int]:
    """The policy's own greedy completion (transformers + peft), cut as the generator cuts."""
    with torch.no_grad():
        out = policy.generate(
            input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=2, pad_token_id=0
        )
    return cut_at_stop(out[0, len(prompt) :].tolist(), 2)


def test_completions_come_per_prompt_and_match_the_policy(generator, policy):
    generator.sync(0)
    assert generator.adapter == "policy-0"
    got = generator.completions(PROMPTS, greedy())
    assert got == [reference(policy, p) for p in PROMPTS]
    assert all(0 < len(c) <= MAX_TOKENS for c in got)
    sampled = generator.completions(PROMPTS, Sampling(n=3, max_tokens=MAX_TOKENS, temperature=1.0, stop_id=2))
    assert len(sampled) == 6 and all(0 < len(c) <= MAX_TOKENS for c in sampled)
    assert all(2 not in c[:-1] for c in sampled)  # cut after the first stop token
    # prompt-major, checked by the generator against each choice's prompt_token_ids (a mismatch raises)


def test_a_stop_token_ends_a_completion_and_is_kept(generator, policy):
    first = reference(policy, PROMPTS[0])[0]  # make the policy's first greedy token the stop token
    got = generator.completions(PROMPTS[:1], Sampling(n=1, max_tokens=MAX_TOKENS, temperature=0.0, stop_id=first))
    assert got == [[first]]


def test_lora_sync_follows_the_interval_and_the_engine_follows_the_new_weights(generator, policy):
    generator.sync(0)
    before = generator.completions(PROMPTS, greedy())
    torch.manual_seed(1)
    randomise_lora_b(policy, std=0.5)  # a policy far from the base
    want = [reference(policy, p) for p in PROMPTS]
    assert want != before
    generator.sync(1)  # one step since the last sync, interval 2: the engine keeps the old adapter
    assert generator.adapter == "policy-0" and generator.completions(PROMPTS, greedy()) == before
    generator.sync(2)
    assert generator.adapter == "policy-2"
    assert generator.completions(PROMPTS, greedy()) == want
    assert not (generator.folder / "adapters" / "step-0").exists()  # the outgoing adapter's folder is deleted
    generator.sync(2, force=True)  # already synced at this step: nothing to do
    assert generator.adapter == "policy-2"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FTW_VLLM_PYTHON": sys.executable}, "trl.use_vllm needs vLLM, and"),  # this Python has no vLLM
        ({"VLLM_EXTRA_ARGS": "--no-such-flag"}, "vLLM for trl.use_vllm did not start: the vllm engine exited"),
    ],
)
def test_an_engine_that_cannot_start_is_a_clear_error(tiny_model_dir, policy, tmp_path, env, message):
    from worker.errors import InfraError
    from worker.train.vllm_generation import VllmGenerator

    cfg = TrainingConfig(
        base_model=str(tiny_model_dir),
        learning_rate=1e-4,
        adapter="lora",
        lora_r=8,
        rl="grpo",
        trl={"use_vllm": True, "reward_funcs": ["exact_match"]},
    )
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**vllm_env(ensure_vllm_env()), **env}.items():
            mp.setenv(k, v)
        with pytest.raises(InfraError, match=message) as failed:
            VllmGenerator(cfg, policy, tmp_path, VllmOptions.from_trl(cfg.trl))
    assert "trl.use_vllm: false" in failed.value.hint or "remove trl.use_vllm" in failed.value.hint
    if "VLLM_EXTRA_ARGS" in env:
        assert "no-such-flag" in failed.value.log_tail  # the engine's own words, for the user
    assert not (tmp_path / "vllm" / "engine.pid").exists()  # no engine was handed to training


def test_transformers_generator_gives_the_same_shape(policy):
    got = TransformersGenerator(policy, pad_id=0).completions(
        PROMPTS, Sampling(n=2, max_tokens=4, temperature=1.0, stop_id=2)
    )
    assert len(got) == 4 and all(0 < len(c) <= 4 for c in got)


def test_close_ends_the_engine_and_its_children(generator):
    pid_file = generator.folder / "engine.pid"
    assert len(group_members(int(pid_file.read_text()))) >= 2  # the API server and its engine core at least
    generator.close()
    assert engine_gone(pid_file, timeout_s=0)  # close() returns once they are all gone
    generator.close()  # idempotent (it runs again at exit)
