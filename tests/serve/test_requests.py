"""Request validation, settings, engine flags and the errors a request meets: no engine started.

Adapters (names, checks, cache, registry) are in test_adapters.py; its tests and test_hostile.py take
`settings` (and `serve_app`) from here."""

from __future__ import annotations

import json

import pytest

from schemas.serve import BatchRequest, ChatCompletionRequest, RequestInvalid, parse_request
from worker.errors import JobSpecError
from worker.serve.engine import vllm_args
from worker.serve.settings import ServeSettings


def settings(**env) -> ServeSettings:
    return ServeSettings.from_env({"MODEL_NAME": "org/base", **env})


# ---- requests
def test_openai_route_shape_parses_to_typed_requests():
    route, req = parse_request(
        {
            "input": {
                "openai_route": "/v1/chat/completions",
                "openai_input": {
                    "model": "org/ad@v1",
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                    "max_completion_tokens": 5,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            }
        }
    )
    assert route == "/v1/chat/completions" and isinstance(req, ChatCompletionRequest)
    assert req.token_limit == 5 and req.messages[0].text() == "hi"


@pytest.mark.parametrize(
    "job, locs",
    [
        (
            {"openai_route": "/v1/chat/completions", "openai_input": {"model": "m", "messages": [], "temprature": 1}},
            {"messages", "temprature"},
        ),
        (
            {
                "openai_route": "/v1/chat/completions",
                "openai_input": {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
            },
            {"messages[0].role"},
        ),
        (
            {"openai_route": "/v1/completions", "openai_input": {"model": "m", "prompt": "", "n": 99, "top_p": 0}},
            {"prompt", "n", "top_p"},
        ),
        ({"openai_route": "/v1/embeddings", "openai_input": {}}, {"openai_route"}),
        ({"openai_route": "/v1/models", "extra": 1}, {"extra"}),
        (
            {"messages": [[{"role": "user", "content": "x"}], []], "generation_kwargs": {"top_k": "a", "beam": 2}},
            {"messages[1]", "generation_kwargs.top_k", "generation_kwargs.beam"},
        ),
        (
            {"messages": [[{"role": "user", "content": "x"}]], "max_tokens": 0, "temperature": "hot"},
            {"max_tokens", "temperature"},
        ),
        ({"messages": [[{"role": "user", "content": "x"}]], "n": 2, "temperature": 0}, {""}),
        ({"prompt": "hi"}, {"input"}),
        (["not", "an", "object"], {"input"}),
    ],
)
def test_bad_requests_report_every_problem_with_its_location(job, locs):
    with pytest.raises(RequestInvalid) as e:
        parse_request(job)
    got = {i.loc for i in e.value.issues}
    assert locs <= got, (got, [str(i) for i in e.value.issues])


def test_a_boolean_is_no_count_in_a_request_and_a_64_bit_seed_passes():
    """Requests derive from the input models' base (schemas/base.py's Frozen): `n: true` is refused
    as it is in a job, while the seed keeps its 64-bit range."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(RequestInvalid) as e:
        parse_request({"openai_route": "/v1/chat/completions", "openai_input": {**chat, "n": True}})
    assert [(i.loc, "must be a number, not true" in i.msg) for i in e.value.issues] == [("n", True)]
    _, request = parse_request({"openai_route": "/v1/chat/completions", "openai_input": {**chat, "seed": 2**63 - 1}})
    assert isinstance(request, ChatCompletionRequest) and request.seed == 2**63 - 1


def test_batch_request_becomes_one_chat_request_per_conversation():
    _, batch = parse_request(
        {
            "messages": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
            "n": 2,
            "temperature": 0.5,
            "top_p": 0.9,
            "max_tokens": 7,
            "generation_kwargs": {"top_k": 5, "stop": ["\n"]},
        }
    )
    assert isinstance(batch, BatchRequest)
    req = batch.chat_request("m", batch.messages[1])
    assert (req.model, req.n, req.temperature, req.top_p, req.max_tokens, req.top_k, req.stop) == (
        "m",
        2,
        0.5,
        0.9,
        7,
        5,
        ["\n"],
    )
    assert req.messages[0].text() == "b"


# ---- settings and engine flags
def test_settings_from_env_and_vllm_flags():
    s = settings(
        MAX_LORAS="3",
        MAX_LORA_RANK="32",
        MAX_CPU_LORAS="6",
        MAX_MODEL_LEN="4096",
        MAX_NUM_SEQS="12",
        DTYPE="bfloat16",
        ENFORCE_EAGER="true",
        VLLM_EXTRA_ARGS="--kv-cache-dtype fp8",
        FTW_SERVE_ADAPTERS="a=org/x@v2",
    )
    args = vllm_args(s, 8123)
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--model"] == "org/base" and flags["--port"] == "8123" and flags["--host"] == "127.0.0.1"
    assert ["--max-loras", "3", "--max-lora-rank", "32", "--max-cpu-loras", "6"] == args[
        args.index("--max-loras") : args.index("--max-loras") + 6
    ]
    assert "--enable-lora" in args and "--enforce-eager" in args and args[-2:] == ["--kv-cache-dtype", "fp8"]
    assert s.concurrency("vllm") == 12 and s.concurrency("transformers") == 2 and s.preload == (("a", "org/x@v2"),)
    assert "--enable-lora" not in vllm_args(settings(ENABLE_LORA="false"), 1)


def test_bad_settings_are_all_reported_at_once():
    with pytest.raises(JobSpecError) as e:
        ServeSettings.from_env(
            {
                "MAX_LORAS": "x",
                "MAX_LORA_RANK": "0",
                "FTW_SERVE_ENGINE": "tgi",
                "FTW_SERVE_ADAPTERS": "noequals",
                "FTW_ENGINE_KEEP_ALIVE_S": "0",
            }
        )
    for name in ("MODEL_NAME", "MAX_LORAS", "MAX_LORA_RANK", "FTW_SERVE_ENGINE", "FTW_SERVE_ADAPTERS", "KEEP_ALIVE"):
        assert name in e.value.message
    with pytest.raises(JobSpecError, match="holds no config.json"):
        ServeSettings.from_env({"MODEL_NAME": "/nonexistent/model"})


def test_auto_engine_is_vllm_only_where_the_engine_python_has_it():
    import sys

    from tests.serve.conftest import VLLM_PYTHON
    from worker.serve.engine import resolve_engine

    assert resolve_engine(settings(FTW_SERVE_PYTHON=sys.executable)) == "transformers"  # the main venv: no vLLM
    if VLLM_PYTHON.exists():
        assert resolve_engine(settings(FTW_SERVE_PYTHON=str(VLLM_PYTHON))) == "vllm"
    assert (
        resolve_engine(settings(FTW_SERVE_ENGINE="transformers", FTW_SERVE_PYTHON=str(VLLM_PYTHON))) == "transformers"
    )


def test_an_engine_python_that_does_not_run_is_said_and_serves_with_transformers(tmp_path, caplog):
    from worker.serve.engine import resolve_engine

    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'error while loading shared libraries: libpython3.12.so' >&2\nexit 127\n")
    broken.chmod(0o755)
    with caplog.at_level("WARNING", logger="ftw.serve"):
        assert resolve_engine(settings(FTW_SERVE_PYTHON=str(broken))) == "transformers"
    assert f"{broken} did not run (exit 127: error while loading shared libraries" in caplog.text


def test_vllm_cpu_kv_cache_is_a_quarter_of_the_available_memory_unless_the_operator_sizes_it(tiny_model_dir):
    """vLLM's CPU build would reserve 92% of the node's memory: ftw gives its KV cache a quarter of what is
    available (1-8 GiB) and says so, and leaves the operator's own sizing alone (vllm_service sizes its own)."""
    import psutil

    from tests.serve.conftest import ensure_vllm_env
    from worker.serve.engine import EngineProcess

    model = {"MODEL_NAME": str(tiny_model_dir), "FTW_SERVE_PYTHON": str(ensure_vllm_env())}
    engine = EngineProcess(settings(**model), "vllm")
    quarter = max(1, min(8, psutil.virtual_memory().available / 2**30 / 4))
    assert engine.cpu_kv_cache_gib in range(1, 9) and abs(engine.cpu_kv_cache_gib - quarter) <= 1, quarter
    assert engine.child_env()["VLLM_CPU_KVCACHE_SPACE"] == str(engine.cpu_kv_cache_gib)
    assert "a quarter of the memory available (VLLM_CPU_KVCACHE_SPACE changes it)" in engine.describe()
    for own in (
        {"VLLM_CPU_KVCACHE_SPACE": "2"},
        {"GPU_MEMORY_UTILIZATION": "0.5"},
        {"VLLM_EXTRA_ARGS": "--kv-cache-memory-bytes 1000000"},
    ):
        chosen = EngineProcess(settings(**model, **own), "vllm")
        assert chosen.cpu_kv_cache_gib is None and "quarter" not in chosen.describe(), own
        assert chosen.child_env().get("VLLM_CPU_KVCACHE_SPACE") == own.get("VLLM_CPU_KVCACHE_SPACE"), own


def unreachable_port() -> str:
    from tests.s3server import free_port

    return f"http://127.0.0.1:{free_port()}"


def serve_app(**env):
    from worker.serve.app import ServeApp
    from worker.serve.engine import EngineClient
    from worker.serve.service import pull_fetch

    s = settings(**env)
    return ServeApp(s, EngineClient(unreachable_port()), pull_fetch(s))


def ask(app, model: str) -> dict:
    import asyncio

    job = {
        "openai_route": "/v1/chat/completions",
        "openai_input": {"model": model, "messages": [{"role": "user", "content": "hi"}]},
    }

    async def scenario():
        try:
            return [out async for out in app.handle_job(job)]
        finally:
            await app.client.close()

    (out,) = asyncio.run(scenario())
    return out


def test_an_unreachable_hub_fails_the_request_with_503_and_a_retry_hint(tmp_path):
    app = serve_app(HF_ENDPOINT=unreachable_port(), BASE_VOLUME=str(tmp_path), FTW_PUBLISH_BACKOFF_S="0")
    error = ask(app, "org/adapter@v1")["error"]
    assert error["code"] == 503 and "could not be reached" in error["message"] and "retry" in error["hint"], error
    assert error["type"] == "server_error"


def test_an_unknown_model_is_404_model_not_found(tmp_path):
    (tmp_path / "store").mkdir()
    for model in ("no-such-run", "what is this?"):
        error = ask(serve_app(BASE_VOLUME=str(tmp_path)), model)["error"]
        assert (error["code"], error["param"], error["type"]) == (
            "model_not_found",
            "model",
            "invalid_request_error",
        ), error
        assert model in error["message"]


def test_an_engine_that_does_not_answer_is_a_clear_503(tmp_path):
    out = ask(serve_app(), "org/base")  # the base model: straight to the engine, whose port nobody listens on
    assert out["error"]["code"] == 503 and "did not answer" in out["error"]["message"]


def test_an_engine_failing_mid_stream_ends_the_stream_with_an_error_event_then_done():
    """The engine dies after its first event (a real server that cuts the connection): the client gets what
    was sent, an error event and [DONE], as OpenAI streams end on an error."""
    import asyncio

    from aiohttp import web

    from tests.s3server import free_port
    from worker.serve.app import ServeApp
    from worker.serve.engine import EngineClient

    async def dies_mid_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"index": 0, "delta": {"content": "hel"}}]}\n\n')
        request.transport.close()  # the engine process is gone
        return response

    async def scenario():
        engine = web.Application()
        engine.router.add_post("/v1/chat/completions", dies_mid_stream)
        runner = web.AppRunner(engine)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        app = ServeApp(settings(), EngineClient(f"http://127.0.0.1:{port}"), fetch=None)
        job = {
            "openai_route": "/v1/chat/completions",
            "openai_input": {"model": "org/base", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        }
        try:
            return [out async for out in app.handle_job(job)]
        finally:
            await app.client.close()
            await runner.cleanup()

    events = asyncio.run(scenario())
    assert len(events) == 3 and "hel" in events[0], events
    assert json.loads(events[1].removeprefix("data: "))["error"]["code"] == 503
    assert events[2] == "data: [DONE]\n\n"


def test_the_worker_process_never_imports_torch_transformers_or_vllm():
    import subprocess
    import sys

    from tests.conftest import REPO, child_env

    code = (
        "import sys, serve_handler, worker.serve.httpserver, worker.publish.pull, worker.publish.vllm_check; "
        "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'peft') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_transformers_engine_counts_the_eos_as_vllm_does(tiny_model_dir, tmp_path):
    """vLLM returns the EOS in token_ids and counts it in completion_tokens (an EOS-ended answer of n
    tokens is n+1); the transformers engine must too. A copy of the tiny model whose EOS is the token it
    answers first ends every greedy answer there."""
    import shutil

    from worker.serve.hf_engine import HFEngine, SamplingSettings

    greedy = SamplingSettings(max_tokens=8, temperature=0)
    first = HFEngine(str(tiny_model_dir)).generate([75, 76], None, greedy).token_ids[0]
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    for name in ("config.json", "generation_config.json"):
        config = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps({**config, "eos_token_id": first}))
    out = HFEngine(str(model)).generate([75, 76], None, greedy)
    assert (out.finish_reason, out.token_ids, out.text) == ("stop", [first], "")
