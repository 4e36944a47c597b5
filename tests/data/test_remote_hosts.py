"""http(s) datasets reach public hosts only (schemas/hosts.py), redirects included, within a size cap.

Every request here goes to loopback: refused targets are refused before any connection. DNS
cannot be served here, so the two tests about what a name resolves to replace getaddrinfo.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from schemas.validate import validate_config
from worker.data.remote import download_http
from worker.errors import DataError

ALLOW = {"FTW_ALLOWED_HOSTS": "127.0.0.1"}
BODY = b'{"instruction": "hi", "output": "hello"}\n' * 100  # 4,100 bytes


@contextmanager
def server() -> Iterator[tuple[str, list[str]]]:
    """A loopback server: /data.jsonl (with Content-Length), /chunked (none), /hop?to=URL (a 302)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            seen.append(self.path)
            if self.path.startswith("/hop?to="):
                self.send_response(302)
                self.send_header("Location", self.path.split("=", 1)[1])
                self.end_headers()
                return
            self.send_response(200)
            if self.path != "/chunked":
                self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("http://127.0.0.1/d.jsonl", "loopback"),
        ("http://localhost:8080/d.jsonl", "inside a network"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/d.jsonl", "link-local"),
        ("http://10.0.0.5/d.jsonl", "private"),
        ("http://172.16.3.4/d.jsonl", "private"),
        ("http://192.168.1.1/d.jsonl", "private"),
        ("http://[fd12::1]/d.jsonl", "private"),
        ("http://0.0.0.0/d.jsonl", "unspecified"),
        ("http://[::]/d.jsonl", "unspecified"),
        ("http://239.1.2.3/d.jsonl", "multicast"),
        ("http://[::ffff:127.0.0.1]/d.jsonl", "loopback"),
        ("http://[::ffff:a9fe:a9fe]/d.jsonl", "link-local"),
        ("http://[64:ff9b::a00:1]/d.jsonl", "private"),
        ("http://2130706433/d.jsonl", "non-standard form"),
        ("http://0x7f000001/d.jsonl", "non-standard form"),
        ("http://0177.0.0.1/d.jsonl", "non-standard form"),
        ("http://127.1/d.jsonl", "non-standard form"),
        ("http://metadata.google.internal/computeMetadata/v1/", "inside a network"),
        ("http://METADATA.google.internal./x", "inside a network"),
        ("http://instance-data/latest/", "inside a network"),
        ("http://100.100.100.200/latest/meta-data", "non-public"),  # shared address space (Alibaba metadata)
    ],
)
def test_literal_internal_hosts_are_refused_at_validation_at_the_key(url, fragment):
    report = validate_config(
        {"base_model": "org/model", "learning_rate": 1e-4, "datasets": [{"path": url, "type": "alpaca"}]}, env={}
    )
    [error] = report.errors
    assert error.loc == "datasets[0].path" and fragment in error.msg and "FTW_ALLOWED_HOSTS" in error.msg


def test_a_public_host_passes_and_the_operator_can_allow_names_and_ranges():
    def errors(url, env):
        return validate_config(
            {"base_model": "org/model", "learning_rate": 1e-4, "datasets": [{"path": url, "type": "alpaca"}]}, env=env
        ).errors

    assert errors("https://data.example.com/d.jsonl", {}) == []
    assert errors("http://10.1.2.3/d.jsonl", {"FTW_ALLOWED_HOSTS": "minio.lan, 10.0.0.0/8"}) == []
    assert errors("http://minio.lan/d.jsonl", {"FTW_ALLOWED_HOSTS": "minio.lan, 10.0.0.0/8"}) == []
    assert errors("http://11.1.2.3/d.jsonl", {"FTW_ALLOWED_HOSTS": "10.0.0.0/8"}) == []  # public anyway
    assert errors("http://192.168.0.1/d.jsonl", {"FTW_ALLOWED_HOSTS": "10.0.0.0/8"}) != []
    # written as host:port or as a URL, an entry still means its host
    assert errors("http://minio.lan:9000/d.jsonl", {"FTW_ALLOWED_HOSTS": "minio.lan:9000"}) == []
    assert errors("http://10.9.8.7:9000/d.jsonl", {"FTW_ALLOWED_HOSTS": "http://10.9.8.7:9000/"}) == []


def test_a_base_model_that_is_a_url_is_refused_by_name():
    report = validate_config(
        {
            "base_model": "https://huggingface.co/org/model",
            "learning_rate": 1e-4,
            "datasets": [{"path": "org/data", "type": "alpaca"}],
        },
        env={},
    )
    [error] = report.errors
    assert error.loc == "base_model" and "is a URL" in error.msg


def test_loopback_is_refused_at_fetch_and_nothing_is_sent(tmp_path):
    with server() as (url, seen):
        with pytest.raises(DataError, match="loopback"):
            download_http(f"{url}/data.jsonl", tmp_path, env={})
    assert seen == [] and list(tmp_path.iterdir()) == []


def test_allowed_loopback_downloads_and_a_redirect_to_a_refused_host_is_not_followed(tmp_path):
    with server() as (url, seen):
        assert download_http(f"{url}/data.jsonl", tmp_path, env=ALLOW).read_bytes() == BODY
        port = url.rsplit(":", 1)[1]
        for target in (f"http://127.0.0.2:{port}/data.jsonl", f"http://[::ffff:127.0.0.2]:{port}/data.jsonl"):
            with pytest.raises(DataError, match="redirect target .* refused: 127.0.0.2 is a loopback"):
                download_http(f"{url}/hop?to={target}", tmp_path / "x", env=ALLOW)
        assert seen == [
            "/data.jsonl",
            f"/hop?to=http://127.0.0.2:{port}/data.jsonl",
            f"/hop?to=http://[::ffff:127.0.0.2]:{port}/data.jsonl",
        ]
        (tmp_path / "ok").mkdir()
        assert download_http(f"{url}/hop?to={url}/data.jsonl", tmp_path / "ok", env=ALLOW).read_bytes() == BODY


def test_the_size_cap_stops_a_download_with_or_without_content_length(tmp_path):
    capped = {**ALLOW, "FTW_MAX_DOWNLOAD_MB": str(4000 / (1 << 20))}  # 4,000 bytes: the body is 4,100
    with server() as (url, _):
        for path in ("/data.jsonl", "/chunked"):
            with pytest.raises(DataError, match="larger than the .* cap") as e:
                download_http(f"{url}{path}", tmp_path, env=capped)
            assert "FTW_MAX_DOWNLOAD_MB" in e.value.hint
            assert not (tmp_path / path.lstrip("/")).exists()  # no partial file left behind
        assert download_http(f"{url}/chunked", tmp_path, env=ALLOW).read_bytes() == BODY


def fake_dns(monkeypatch, answers: list[str]) -> list[str]:
    """getaddrinfo answering `answers` in turn (the last one repeated); returns the names asked."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "data.example.com":
            return real(host, port, *args, **kwargs)
        asked.append(host)
        address = answers[min(len(asked), len(answers)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_a_public_name_that_resolves_to_an_internal_address_is_refused_at_fetch(tmp_path, monkeypatch):
    fake_dns(monkeypatch, ["127.0.0.1"])
    with server() as (url, seen):
        port = url.rsplit(":", 1)[1]
        with pytest.raises(DataError, match="resolves to a refused address: 127.0.0.1 is a loopback"):
            download_http(f"http://data.example.com:{port}/data.jsonl", tmp_path, env={})
    assert seen == []


def test_the_connection_goes_to_the_checked_address_so_a_second_answer_cannot_swap_it(tmp_path, monkeypatch):
    """DNS rebinding: the first answer is allowed, a later one is not; ftw resolves once and uses the first."""
    asked = fake_dns(monkeypatch, ["127.0.0.1", "127.0.0.2"])
    with server() as (url, seen):
        port = url.rsplit(":", 1)[1]
        got = download_http(
            f"http://data.example.com:{port}/data.jsonl", tmp_path, env={"FTW_ALLOWED_HOSTS": "127.0.0.1/32"}
        )
    assert got.read_bytes() == BODY and seen == ["/data.jsonl"] and len(asked) == 1


def test_a_refusal_quotes_neither_a_password_nor_a_signature():
    report = validate_config(
        {
            "base_model": "org/model",
            "learning_rate": 1e-4,
            "datasets": [
                {"path": "https://user:hunter2pass@10.0.0.1/d.jsonl?X-Amz-Signature=SECRETSIG", "type": "alpaca"}
            ],
        },
        env={},
    )
    [error] = report.errors
    assert "10.0.0.1/d.jsonl" in error.msg and "hunter2pass" not in error.msg and "SECRETSIG" not in error.msg
