"""`ftw run` on a tiny Qwen3-MoE, on CPU: LoRA on attention and on the routed experts (PEFT
target_parameters), packed, with the router aux loss; the adapter, published to the local store,
is served by the serving worker (the transformers engine: vLLM on CPU has no MoE LoRA, and the
publish step says so) and answers held-out prompts of a task it was never shown."""

from __future__ import annotations

import json
import sys

import pytest

from tests.train.helpers import SUCCESSOR_SCHEDULE, run_job, successor_task, write_segments

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_ftw_run_trains_expert_lora_that_learns_and_is_served(
    task_moe_model_dir, volume, tmp_path, s3_server, hub_server
):
    from tests.serve.conftest import collect, run, serve_env, start_service

    train, held = successor_task()
    data = write_segments(volume / "successor.jsonl", train)
    config = {
        "base_model": str(task_moe_model_dir),
        "datasets": [{"path": str(data), "type": "input_output"}],
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "output_router_logits": True,
        "router_aux_loss_coef": 0.01,
        **SUCCESSOR_SCHEDULE,
    }
    job = {"input": {"run_id": "moe-successor", "allow_cpu": True, "config": config, "publish": ["adapter"]}}
    result = run_job(job, tmp_path, volume, timeout=840, FTW_ALLOWED_PATHS=str(task_moe_model_dir))
    assert result["status"] == "completed", result

    # the adapter in PEFT's format, LoRA on the expert tensors; publish says plainly where it can be served
    adapter = next(a for a in result["artifacts"] if a["kind"] == "adapter")
    assert any(
        "vLLM on CPU cannot load it" in w and "FTW_SERVE_ENGINE=transformers" in w for w in adapter["warnings"]
    ), adapter
    run_dir = volume / "runs" / "moe-successor"
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["packed"] is True and summary["loss_curve"][-1][1] < summary["loss_curve"][0][1]
    steps = [
        json.loads(line) for events in run_dir.glob("logs/**/events.jsonl") for line in events.read_text().splitlines()
    ]
    aux = [e["aux_loss"] for e in steps if e.get("stage") == "train" and "aux_loss" in e]
    assert aux and all(a > 0 for a in aux)  # the router loss is on and logged on its own

    # the serving worker (transformers engine) loads the published adapter by run id and answers held-out prompts
    serve = serve_env(
        task_moe_model_dir,
        s3_server,
        hub_server,
        volume,
        FTW_SERVE_ENGINE="transformers",
        FTW_SERVE_PYTHON=sys.executable,
        FTW_ALLOWED_PATHS=str(task_moe_model_dir),
    )
    prompts = held[:50]
    with start_service("transformers", serve, tmp_path / "engine.log") as service:
        outputs = run(
            collect(
                service.app,
                {
                    "openai_route": "/v1/completions",
                    "openai_input": {
                        "model": "moe-successor",
                        "prompt": [p for p, _ in prompts],
                        "temperature": 0,
                        "max_tokens": 8,
                        "stop": ["<|im_end|>"],
                    },
                },
            )
        )
        run(service.app.client.close())
    choices = sorted(outputs[0]["choices"], key=lambda c: c["index"])
    exact = sum(c["text"] == want for c, (_, want) in zip(choices, prompts)) / len(prompts)
    assert exact >= 0.9, [(c["text"], want) for c, (_, want) in zip(choices[:5], prompts[:5])]
