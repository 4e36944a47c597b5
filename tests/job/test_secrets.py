"""Secret handling of the orchestrator: where secrets come from, where they may go, redaction."""

from __future__ import annotations

import json
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.job import validate_job
from schemas.secrets import Redactor, StreamRedactor, child_env, env_secrets, job_credential_env
from tests.conftest import REPO
from tests.job.conftest import example_job
from worker.job.updates import Throttle, format_line

SECRET = "s3cr3t-VALUE-0123456789"


def test_sources_of_secrets_and_the_child_environment():
    env = {
        "HF_TOKEN": "hf_env_token_1",
        "MY_SERVICE_PASSWORD": "pw-123456",
        "PATH": "/usr/bin",
        "RUNPOD_AI_API_KEY": "rp-key-123",
        "RUNPOD_WEBHOOK_GET_JOB": "http://x",
        "FTW_ENDPOINT_API_KEY": "ep-key-123",
        "TOKENIZERS_PARALLELISM": "false",
    }
    assert set(env_secrets(env)) == {"hf_env_token_1", "pw-123456", "rp-key-123", "ep-key-123"}
    job = validate_job(
        {"input": example_job(credentials={"hf_token": "hf_job_token_2", "aws_secret_access_key": "aws-job-3"})}, env={}
    ).value
    creds = job_credential_env(
        job.credentials, {"accessId": "AKIA-4", "accessSecret": "s3cfg-secret-5", "bucketName": "b"}
    )
    assert creds == {
        "HF_TOKEN": "hf_job_token_2",
        "AWS_SECRET_ACCESS_KEY": "aws-job-3",
        "BUCKET_ACCESS_KEY_ID": "AKIA-4",
        "BUCKET_SECRET_ACCESS_KEY": "s3cfg-secret-5",
        "BUCKET_NAME": "b",
    }
    child = child_env(env, creds, {"BASE_VOLUME": "/runpod-volume"})
    assert child["HF_TOKEN"] == "hf_job_token_2"  # the job's own token wins over the endpoint's
    assert (
        "RUNPOD_AI_API_KEY" not in child
        and "RUNPOD_WEBHOOK_GET_JOB" not in child
        and "FTW_ENDPOINT_API_KEY" not in child
    )
    assert "credentials" not in job.public_dict()
    redactor = Redactor.for_job(env, creds, {"accessSecret": "s3cfg-secret-5"})
    text = redactor.text("hf_env_token_1 hf_job_token_2 s3cfg-secret-5 https://user:pw@host/x pw-123456")
    assert text == "*** *** *** https://***@host/x ***"
    # s3Config's bucket and endpoint are where artifacts go, not secrets: the result's URIs keep them
    s3_config = {"accessId": "AKIA-4", "accessSecret": "s3cfg-secret-5", "bucketName": "my-bucket"}
    redactor = Redactor.for_job(env, job_credential_env(job.credentials, s3_config), s3_config)
    assert redactor.text("s3://my-bucket/run AKIA-4 s3cfg-secret-5") == "s3://my-bucket/run *** ***"


def test_settings_named_like_secrets_do_not_mask_plain_words_in_a_stage_summary():
    # TOKENIZERS_PARALLELISM=false is in many endpoints' environment: masking "false" broke the
    # preprocess summary of every cached (built: false) resubmit
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TOKEN_CHECK": "true", "SERVICE_TOKEN": "s-tok-123"}
    assert env_secrets(env) == ["s-tok-123"]
    summary = '{"complete": true, "built": false, "cache_dir": "/v/cache/x"}'
    assert json.loads(Redactor.for_job(env, {}, None).text(summary))["built"] is False


def test_redactor_walks_json_structures():
    redactor = Redactor([SECRET])
    data = {"a": [f"x{SECRET}y", {"k": SECRET, SECRET: 1}], "n": 3, "none": None}
    assert redactor.data(data) == {"a": ["x***y", {"k": "***", "***": 1}], "n": 3, "none": None}


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab-x", max_size=60), st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=40))
def test_stream_redaction_is_independent_of_chunking(noise, cuts):
    """However the bytes are split across reads, the output equals redacting the whole at once."""
    data = (noise + SECRET + noise + SECRET[:5] + noise + SECRET).encode()
    redactor = Redactor([SECRET])
    stream, out, i = StreamRedactor(redactor), b"", 0
    for n in cuts * 20:
        if i >= len(data):
            break
        out += stream.feed(data[i : i + n])
        i += n
    out += stream.feed(data[i:]) + stream.flush()
    assert out == redactor.bytes(data) and SECRET.encode() not in out


def test_progress_throttle_passes_stage_changes_and_holds_steps():
    sent = []
    throttle = Throttle(sent.append, interval_s=3600)
    throttle({"stage": "preprocess", "message": "preparing"})
    throttle({"stage": "train", "step": 1, "loss": 2.0})
    throttle({"stage": "train", "step": 2, "loss": 1.9})
    throttle({"stage": "train", "step": 3, "loss": 1.8})
    throttle({"stage": "publish", "message": "publishing"})
    assert [(u["stage"], u.get("step")) for u in sent] == [
        ("preprocess", None),
        ("train", 1),
        ("train", 3),
        ("publish", None),
    ]
    assert (
        format_line(
            {"stage": "train", "step": 12, "total_steps": 40, "loss": 2.31, "tokens_per_s": 1234.0, "eta_s": 35}
        )
        == "train       step 12/40  loss 2.3100  1.2k tok/s  eta 0:00:35"
    )
    assert (
        format_line({"stage": "publish", "what": "adapter", "bytes_done": 3 << 20, "bytes_total": 12 << 20, "eta_s": 4})
        == "publish     adapter 3.0/12.0 MiB  eta 0:00:04"
    )


PRESIGNED = (
    "https://bucket.s3.amazonaws.com/d.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAFAKECRED0001%2F20261202"
    "&X-Amz-Signature=fakesig0123456789abcdef&X-Amz-Expires=3600"
)


def test_what_is_secret_by_its_shape_is_masked_without_knowing_the_value():
    shapes = Redactor([])
    text = f"get {PRESIGNED} from https://alice:pa55word@host/x and https://h/x?sig=SAS0001&sv=2024 or ?token=T0K3N#top"
    masked = shapes.text(text)
    for secret in ("AKIAFAKECRED0001", "fakesig0123", "pa55word", "SAS0001", "T0K3N"):
        assert secret not in masked
    assert (
        "X-Amz-Signature=***" in masked
        and "https://***@host/x" in masked
        and "sv=2024" in masked
        and "X-Amz-Expires=3600" in masked
    )
    assert shapes.bytes(text.encode()) == masked.encode()
    data = {
        "hf_token": "hf_abcdefgh",
        "nested": [{"apiKey": "k-123456", "pad_token": "<|pad|>", "hf_use_auth_token": True}],
        "path": PRESIGNED,
    }
    clean = shapes.data(data)
    assert clean["hf_token"] == "***" and clean["nested"] == [
        {"apiKey": "***", "pad_token": "<|pad|>", "hf_use_auth_token": True}
    ]
    assert "fakesig" not in clean["path"]


def test_redaction_is_linear_on_hostile_text():
    """The userinfo pattern used to be quadratic on text without '://' (40k characters: 5 s; 2 MB:
    hours). Each hostile 2 MB text below is redacted in a child that must answer within 2 minutes."""
    script = (
        "from schemas.secrets import Redactor\n"
        "r = Redactor(['sekrit-123'])\n"
        "n = 2_000_000\n"
        "for text in ('a' * n, 'a://' + 'b' * n, 'a://b' * (n // 5), '?token=' * (n // 7), 'x:' * (n // 2)):\n"
        "    assert len(r.text(text)) <= len(text) and len(r.bytes(text.encode())) <= len(text)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_presigned_url_split_across_reads_is_still_masked_in_a_log():
    stream = StreamRedactor(Redactor([]))
    data = f"loading {PRESIGNED}\nnext line\n".encode()
    out = b"".join(stream.feed(data[i : i + 7]) for i in range(0, len(data), 7)) + stream.flush()
    assert b"fakesig" not in out and b"AKIAFAKECRED" not in out and out.endswith(b"next line\n")


def test_no_file_of_a_run_keeps_a_url_secret_and_the_stage_children_still_get_it(demo_volume, monkeypatch):
    """config.json, job.json and checks.json hold the presigned URL and the URL's password masked; the
    children get the real values in their environment, and their config loader puts them back."""
    import json
    import os

    from worker.documents import config_from_file
    from worker.errors import DataError
    from worker.job.pipeline import JobPipeline, run_job

    url_with_password = "https://alice:pa55word-FAKE@data.example.com/extra.jsonl"
    job = example_job(
        run_id="url-secrets",
        config={
            "datasets": [
                {"path": "./data/greetings.jsonl", "type": "chat_template", "field_messages": "messages"},
                {"path": PRESIGNED, "type": "chat_template", "field_messages": "messages", "ds_type": "json"},
                {"path": url_with_password, "type": "chat_template", "field_messages": "messages"},
            ]
        },
    )
    seen = {}

    def capture_and_stop(self, run, config_path):
        seen["env"] = self.stage_env()
        monkeypatch.setattr(os, "environ", {**os.environ, **seen["env"]})
        seen["config"] = config_from_file(config_path, "test")[0]
        raise DataError("stopped by the test before preprocessing")

    monkeypatch.setattr(JobPipeline, "preprocess", capture_and_stop)
    monkeypatch.setattr("worker.checks.stage.check_machine", lambda *a, **k: None)  # it would fetch the URLs
    result = run_job({"input": job})
    assert result["error"]["message"] == "stopped by the test before preprocessing", result
    run = demo_volume / "runs" / "url-secrets"
    for name in ("config.json", "job.json", "checks.json", "result.json"):
        text = (run / name).read_text()
        assert "fakesig" not in text and "AKIAFAKECRED" not in text and "pa55word" not in text, name
    written = json.loads((run / "config.json").read_text())["datasets"]
    assert (
        "X-Amz-Signature=***" in written[1]["path"] and written[2]["path"] == "https://***@data.example.com/extra.jsonl"
    )
    assert [d.path for d in seen["config"].datasets] == ["./data/greetings.jsonl", PRESIGNED, url_with_password]
