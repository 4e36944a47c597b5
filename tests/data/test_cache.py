"""The cache cannot go stale: content edits, tokenizer changes and incomplete folders all miss;
dataset_prepared_path is honoured; remote sources (loopback HTTP, rclone S3) are fingerprinted by
their bytes."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import threading

import pytest

from tests.data.helpers import alpaca_rows, config, write_jsonl
from worker.data.cache import load_prepared
from worker.data.pipeline import prepare
from worker.errors import DataError


def test_hit_then_in_place_edit_misses(volume, tokenizer_dir):
    path = write_jsonl(volume / "a.jsonl", alpaca_rows(30))
    cfg = config(tokenizer_dir, [{"path": str(path), "type": "alpaca"}])
    first = prepare(cfg)
    assert first["built"] and not prepare(cfg)["built"]
    stat = path.stat()
    os.utime(path, (stat.st_atime + 100, stat.st_mtime + 100))  # touched, same bytes: still a hit
    assert prepare(cfg)["cache_dir"] == first["cache_dir"]
    text = path.read_text()
    path.write_text(text.replace("hello", "world", 1))  # same size, one word changed, same mtime
    os.utime(path, (stat.st_atime, stat.st_mtime))
    edited = prepare(cfg)
    assert edited["built"] and edited["cache_dir"] != first["cache_dir"]


def test_tokenizer_and_token_config_changes_miss(volume, tokenizer_dir):
    path = write_jsonl(volume / "a.jsonl", alpaca_rows(30))
    cfg = config(tokenizer_dir, [{"path": str(path), "type": "alpaca"}])
    base = prepare(cfg)["cache_dir"]
    assert prepare(cfg.model_copy(update={"tokens": ["<extra>"]}))["cache_dir"] != base
    assert prepare(cfg.model_copy(update={"sequence_len": 256}))["cache_dir"] != base
    assert prepare(cfg.model_copy(update={"learning_rate": 3e-4}))["cache_dir"] == base  # not a token key
    other_tok = volume / "tok-copy"
    other_tok.mkdir()
    for f in tokenizer_dir.iterdir():
        (other_tok / f.name).write_bytes(f.read_bytes())
    config_file = other_tok / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["eos_token"] = "<|endoftext|>"
    config_file.write_text(json.dumps(tok_config))
    assert prepare(cfg.model_copy(update={"base_model": str(other_tok)}))["cache_dir"] != base


def test_incomplete_cache_is_never_used(volume, tokenizer_dir):
    path = write_jsonl(volume / "a.jsonl", alpaca_rows(30))
    cfg = config(tokenizer_dir, [{"path": str(path), "type": "alpaca"}])
    folder = prepare(cfg)["cache_dir"]
    manifest = json.loads((volume / "cache" / folder / "manifest.json").read_text())
    (volume / "cache" / folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DataError, match="not a complete prepared-data cache"):
        load_prepared(folder)
    rebuilt = prepare(cfg)
    assert rebuilt["built"] and rebuilt["cache_dir"] == folder
    assert load_prepared(folder).manifest["complete"] is True


def test_dataset_prepared_path_relative_is_under_the_volume(volume, tokenizer_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(volume / "a.jsonl", alpaca_rows(10))
    summary = prepare(
        config(tokenizer_dir, [{"path": str(path), "type": "alpaca"}], dataset_prepared_path="last_run_prepared")
    )
    assert summary["cache_dir"].startswith(str(volume / "last_run_prepared") + "/")
    assert not (tmp_path / "last_run_prepared").exists()


@contextlib.contextmanager
def http_server(root):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_source(volume, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FTW_ALLOWED_HOSTS", "127.0.0.1")  # the operator allows the loopback server
    served = tmp_path / "www"
    write_jsonl(served / "data.jsonl", alpaca_rows(12))
    with http_server(served) as url:
        summary = prepare(config(tokenizer_dir, [{"path": f"{url}/data.jsonl?sig=SECRET", "type": "alpaca"}]))
        assert summary["rows"]["train"] == 12
        assert "SECRET" not in json.dumps(summary)
        with pytest.raises(DataError, match=r"/missing\.jsonl: cannot download \(HTTP 404") as e:
            prepare(config(tokenizer_dir, [{"path": f"{url}/missing.jsonl?sig=SECRET", "type": "alpaca"}]))
        assert "SECRET" not in e.value.message


def test_s3_object_and_prefix(volume, tokenizer_dir, s3_server, monkeypatch):  # noqa: F811
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket("data-tests")
    client = s3_server.client()
    body = "".join(json.dumps(r) + "\n" for r in alpaca_rows(20))
    client.put_object(Bucket=bucket, Key="one/train.jsonl", Body=body.encode())
    client.put_object(
        Bucket=bucket, Key="parts/a.jsonl", Body="".join(json.dumps(r) + "\n" for r in alpaca_rows(5, seed=1)).encode()
    )
    client.put_object(
        Bucket=bucket, Key="parts/b.jsonl", Body="".join(json.dumps(r) + "\n" for r in alpaca_rows(6, seed=2)).encode()
    )
    single = config(tokenizer_dir, [{"path": f"s3://{bucket}/one/train.jsonl", "type": "alpaca"}])
    first = prepare(single)
    assert first["rows"]["train"] == 20 and first["built"]
    assert not prepare(single)["built"]
    client.put_object(Bucket=bucket, Key="one/train.jsonl", Body=body.replace("hello", "world", 1).encode())
    assert prepare(single)["cache_dir"] != first["cache_dir"]  # the object changed: a miss
    folder = prepare(config(tokenizer_dir, [{"path": f"s3://{bucket}/parts/", "type": "alpaca"}]))
    assert folder["rows"]["train"] == 11
    with pytest.raises(DataError, match=rf"s3://{bucket}/nothing-here: no object or folder"):
        prepare(config(tokenizer_dir, [{"path": f"s3://{bucket}/nothing-here", "type": "alpaca"}]))
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(DataError, match="cannot download from S3") as e:
        prepare(config(tokenizer_dir, [{"path": f"s3://{bucket}/parts/", "type": "alpaca"}]))
    assert "wrong-secret" not in e.value.message


def test_scratch_of_dead_processes_is_reaped_only_on_their_own_host(tmp_path):
    """On a network volume several workers share, another host's pid says nothing: its folder stays."""
    import socket
    import subprocess
    import sys

    from worker.data.cache import scratch_dir

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    host = socket.gethostname().replace("-", "_")
    mine, theirs = tmp_path / f".scratch-{host}-{dead}-0000", tmp_path / f".scratch-other_host-{dead}-0000"
    for folder in (mine, theirs):
        (folder / "downloads").mkdir(parents=True)
    fresh = scratch_dir(tmp_path)
    assert fresh.is_dir() and not mine.exists() and (theirs / "downloads").is_dir()

    import os
    import time

    from worker.data.cache import SCRATCH_STALE_S

    abandoned = time.time() - SCRATCH_STALE_S - 60  # a killed worker of another host never comes back to clean up
    os.utime(theirs, (abandoned, abandoned))
    scratch_dir(tmp_path)
    assert not theirs.exists() and fresh.is_dir()
