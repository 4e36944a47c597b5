"""Secret handling of the orchestrator: where secrets come from, where they may go, redaction."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.job import validate_job
from tests.job.conftest import example_job
from worker.job.progress import Throttle, format_line
from schemas.secrets import Redactor, StreamRedactor, child_env, env_secrets, job_credential_env

SECRET = "s3cr3t-VALUE-0123456789"


def test_sources_of_secrets_and_the_child_environment():
    env = {"HF_TOKEN": "hf_env_token_1", "MY_SERVICE_PASSWORD": "pw-123456", "PATH": "/usr/bin", "RUNPOD_AI_API_KEY": "rp-key-123",
           "RUNPOD_WEBHOOK_GET_JOB": "http://x", "FTW_ENDPOINT_API_KEY": "ep-key-123"}
    assert set(env_secrets(env)) == {"hf_env_token_1", "pw-123456", "rp-key-123", "ep-key-123"}
    job = validate_job({"input": example_job(credentials={"hf_token": "hf_job_token_2", "aws_secret_access_key": "aws-job-3"})}, env={}).value
    creds = job_credential_env(job.credentials, {"accessId": "AKIA-4", "accessSecret": "s3cfg-secret-5", "bucketName": "b"})
    assert creds == {"HF_TOKEN": "hf_job_token_2", "AWS_SECRET_ACCESS_KEY": "aws-job-3", "BUCKET_ACCESS_KEY_ID": "AKIA-4",
                     "BUCKET_SECRET_ACCESS_KEY": "s3cfg-secret-5", "BUCKET_NAME": "b"}
    child = child_env(env, creds, {"FTW_RUN_ID": "r"})
    assert child["HF_TOKEN"] == "hf_job_token_2"  # the job's own token wins over the endpoint's
    assert "RUNPOD_AI_API_KEY" not in child and "RUNPOD_WEBHOOK_GET_JOB" not in child and "FTW_ENDPOINT_API_KEY" not in child
    assert "credentials" not in job.public_dict()
    redactor = Redactor.for_job(env, creds, {"accessSecret": "s3cfg-secret-5"})
    text = redactor.text("hf_env_token_1 hf_job_token_2 s3cfg-secret-5 https://user:pw@host/x pw-123456")
    assert text == "*** *** *** https://***@host/x ***"


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
        out += stream.feed(data[i:i + n])
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
    assert [(u["stage"], u.get("step")) for u in sent] == [("preprocess", None), ("train", 1), ("train", 3), ("publish", None)]
    assert format_line({"stage": "train", "step": 12, "total_steps": 40, "loss": 2.31, "tokens_per_s": 1234.0, "eta_s": 35}) == \
        "train       step 12/40  loss 2.3100  1.2k tok/s  eta 0:00:35"
    assert format_line({"stage": "publish", "what": "adapter", "bytes_done": 3 << 20, "bytes_total": 12 << 20, "eta_s": 4}) == \
        "publish     adapter 3.0/12.0 MiB  eta 0:00:04"
