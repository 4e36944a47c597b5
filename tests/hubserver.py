"""A small local Hugging Face Hub for tests: the HTTP API parts the real huggingface_hub client uses.

    pytest_plugins = ["tests.hubserver"]
    def test_x(hub_server):
        endpoint, token = hub_server            # unpacks to (endpoint_url, token)
        HfApi(endpoint=endpoint, token=token).create_repo("me/x", private=True)

The real Hub cannot be reached here, so this is the one fake of the suite; it speaks the protocol of
huggingface_hub 1.x (read from hf_api.py, _commit_api.py, file_download.py, _snapshot_download.py):

- POST /api/repos/create                       create_repo (409 when it exists)
- GET  /api/{type}s/{repo}[/revision/{rev}]    repo_info / model_info (sha, siblings, private)
- POST /api/validate-yaml                      README.md metadata check of create_commit
- POST /api/{type}s/{repo}/preupload/{rev}     every file "regular": sent base64 in the commit (no LFS/Xet)
- POST /api/{type}s/{repo}/commit/{rev}        ndjson commit: header + file/deletedFile lines
- POST /api/{type}s/{repo}/branch/{branch}     create_branch (409 when it exists)
- GET  /api/{type}s/{repo}/refs                list_repo_refs
- GET  /api/{type}s/{repo}/tree/{rev}[/{path}] list_repo_tree / list_repo_files (recursive or not)
- HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}   hf_hub_download (X-Repo-Commit, ETag, Range)

Writes need the token; private repos need it to read too (401 otherwise, as the Hub answers).
Commits are content-addressed (sha1 of parent, tree and message), blobs are git blob sha1s, and
everything lives under a temp folder (the repositories: tests/hub_store.py); `HubServer.requests` records
(method, path) for assertions and `HubServer.fail_next(path_part, status, times)` makes the next matching
requests fail.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from tests.hub_store import HubError, RepoStore

TOKEN = "hf_ftwTestTokenDoNotLeak0123456789"
REPO_TYPES = ("model", "dataset", "space")
CHUNK = 1 << 16
GATED_CHUNK_S = 4.0  # well inside huggingface_hub's read timeout (10 s)


class HubServer:
    """The running server: unpacks to (endpoint_url, token); `store` and `requests` for assertions."""

    def __init__(self, endpoint_url: str, token: str, store: RepoStore):
        self.endpoint_url, self.token, self.store = endpoint_url, token, store
        self.requests: list[tuple[str, str]] = []
        self.request_times: list[float] = []  # time.time() of each request, in the order of `requests`
        self.file_bytes_per_s: float | None = None  # a slow link for file downloads (bench/model_prefetch.py)
        # on the slow link, while this returns False, a file's chunks come one every GATED_CHUNK_S: a download
        # that outlasts something the test waits for, however slow the machine is
        self.file_gate: Callable[[], bool] | None = None
        self.faults: list[list[Any]] = []  # [path substring, status, times left]: see fail_next
        self.faults_lock = threading.Lock()  # the server answers on many threads

    def fail_next(self, path_part: str, status: int, times: int = 1) -> None:
        """Answer the next `times` requests whose path contains `path_part` with `status` (fault injection)."""
        self.faults.append([path_part, status, times])

    def injected_fault(self, path: str) -> int | None:
        with self.faults_lock:
            for fault in self.faults:
                if fault[0] in path and fault[2] > 0:
                    fault[2] -= 1
                    return fault[1]
        return None

    def __iter__(self):
        return iter((self.endpoint_url, self.token))

    def commits(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> list[dict[str, Any]]:
        """The commits of a branch, newest first, each with its sha."""
        out, sha = [], self.store.refs(repo_type, repo_id).get(branch)
        while sha:
            record = self.store.commit_record(repo_type, repo_id, sha)
            out.append({"sha": sha, **record})
            sha = record["parent"]
        return out


def _split_repo(parts: list[str]) -> tuple[str, str, list[str]]:
    """['models'|'datasets'|..., ns, name, rest...] → (repo_type, repo_id, rest)."""
    kind = parts[0].removesuffix("s")
    if kind not in REPO_TYPES or len(parts) < 3:
        raise HubError(404, "Not found")
    return kind, f"{parts[1]}/{parts[2]}", parts[3:]


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    store = server.store

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: the test output is for assertions
            pass

        # -- plumbing ------------------------------------------------------------------------
        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict[str, str] | None = None,
            content_type: str = "application/json",
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "HEAD":
                return
            rate = server.file_bytes_per_s if content_type == "application/octet-stream" else None
            if rate is None:
                self.wfile.write(body)
                return
            for start in range(0, len(body), CHUNK):  # a slow link: a chunk at a time
                self.wfile.write(body[start : start + CHUNK])
                gate = server.file_gate
                time.sleep(CHUNK / rate if gate is None or gate() else GATED_CHUNK_S)

        def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _body(self) -> bytes:
            return self.raw_body

        def _authorized(self) -> bool:
            return self.headers.get("Authorization", "") == f"Bearer {server.token}"

        def _need_auth(self) -> None:
            if self.headers.get("Authorization") and not self._authorized():
                raise HubError(401, "Invalid credentials in Authorization header")
            if not self._authorized():
                raise HubError(401, "Unauthorized: a write token is needed")

        def _readable(self, repo_type: str, repo_id: str) -> None:
            if store.meta(repo_type, repo_id)["private"] and not self._authorized():
                raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")

        def _dispatch(self) -> None:
            # read the whole body first: an error answered before it would desync the kept-alive connection
            self.raw_body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            url = urlsplit(self.path)
            server.requests.append((self.command, url.path))
            server.request_times.append(time.time())
            parts = url.path.strip("/").split("/")  # still quoted: a revision may hold an encoded '/'
            query = parse_qs(url.query)
            try:
                status = server.injected_fault(url.path)
                if status is not None:
                    raise HubError(status, f"injected fault {status}")
                if parts[0] == "api":
                    self._api(parts[1:], query)
                else:
                    self._resolve(parts)
            except HubError as e:
                headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
                self._json({"error": e.message, **e.body}, e.status, headers)

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _dispatch

        # -- API -----------------------------------------------------------------------------
        def _api(self, parts: list[str], query: dict[str, list[str]]) -> None:
            if parts == ["repos", "create"] and self.command == "POST":
                self._need_auth()
                payload = json.loads(self._body())
                repo_id = f"{payload.get('organization')}/{payload['name']}"
                private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
                url = f"{server.endpoint_url}/{repo_id}"
                try:
                    store.create(payload.get("type") or "model", repo_id, private)
                except HubError as e:
                    raise HubError(e.status, e.message, e.code, url=url) from None  # the client reads url on 409
                return self._json({"url": url, "name": repo_id})
            if parts == ["validate-yaml"]:
                return self._json({"errors": [], "warnings": []})
            repo_type, repo_id, rest = _split_repo(parts)
            op = rest[0] if rest else ""
            rev = unquote(rest[1]) if len(rest) > 1 else "main"
            if self.command == "POST":
                self._need_auth()
                store.meta(repo_type, repo_id)
                if op == "preupload":
                    return self._preupload(repo_type, repo_id, rev)
                if op == "commit":
                    return self._commit(repo_type, repo_id, rev)
                if op == "branch":
                    payload = json.loads(self._body() or b"{}")
                    store.create_branch(repo_type, repo_id, rev, payload.get("startingPoint"))
                    return self._json({})
                raise HubError(404, f"unknown API {op!r}")
            self._readable(repo_type, repo_id)
            if op in ("", "revision"):
                sha, tree = store.tree(repo_type, repo_id, rev)
                meta = store.meta(repo_type, repo_id)
                with_blobs = query.get("blobs", ["false"])[0].lower() == "true"  # files_metadata=True asks for sizes
                return self._json(
                    {
                        "id": repo_id,
                        "sha": sha,
                        "private": meta["private"],
                        "siblings": [
                            {"rfilename": p, **({"size": len(store.blob(repo_type, repo_id, b))} if with_blobs else {})}
                            for p, b in tree.items()
                        ],
                        "tags": [],
                        "lastModified": "2026-01-01T00:00:00.000Z",
                    }
                )
            if op == "refs":
                refs = store.refs(repo_type, repo_id)
                return self._json(
                    {
                        "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in refs.items()],
                        "tags": [],
                        "converts": [],
                    }
                )
            if op == "tree":
                return self._tree(
                    repo_type,
                    repo_id,
                    rev,
                    unquote("/".join(rest[2:])),
                    query.get("recursive", ["False"])[0].lower() == "true",
                )
            raise HubError(404, f"unknown API {op!r}")

        def _preupload(self, repo_type: str, repo_id: str, rev: str) -> None:
            payload = json.loads(self._body())
            _, tree = store.tree(repo_type, repo_id, rev)
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
                for f in payload["files"]
            ]
            self._json({"files": files, "commitOid": store.resolve(repo_type, repo_id, rev)})

        def _commit(self, repo_type: str, repo_id: str, rev: str) -> None:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            header = next((x["value"] for x in lines if x["key"] == "header"), {})
            files: dict[str, bytes] = {}
            deletions: list[str] = []
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    deletions.append(value["path"].rstrip("/") + ("/" if item["key"] == "deletedFolder" else ""))
                elif item["key"] == "lfsFile":
                    raise HubError(400, "this test Hub takes regular (base64) files only")
            sha = store.commit(
                repo_type, repo_id, rev, header.get("summary", ""), files, deletions, header.get("parentCommit")
            )
            self._json(
                {"commitUrl": f"{server.endpoint_url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
            )

        def _tree(self, repo_type: str, repo_id: str, rev: str, path: str, recursive: bool) -> None:
            _, tree = store.tree(repo_type, repo_id, rev)
            prefix = f"{path.strip('/')}/" if path.strip("/") else ""
            entries, folders = [], set()
            for p, blob_sha in tree.items():
                if not p.startswith(prefix):
                    continue
                sub = p[len(prefix) :].split("/")
                for i in range(1, len(sub) if recursive else min(2, len(sub))):
                    folders.add(prefix + "/".join(sub[:i]))
                if recursive or len(sub) == 1:
                    size = len(store.blob(repo_type, repo_id, blob_sha))
                    entries.append({"type": "file", "oid": blob_sha, "size": size, "path": p})
            if prefix and not entries and not folders:
                raise HubError(404, f"{path} does not exist", "EntryNotFound")
            dirs = [
                {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                for f in sorted(folders)
            ]
            self._json(dirs + entries)

        # -- downloads -----------------------------------------------------------------------
        def _resolve(self, parts: list[str]) -> None:
            if parts[0] in ("datasets", "spaces"):
                repo_type, parts = parts[0].removesuffix("s"), parts[1:]
            else:
                repo_type = "model"
            if len(parts) < 5 or parts[2] != "resolve":
                raise HubError(404, "Not found")
            repo_id, rev, path = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
            self._readable(repo_type, repo_id)
            sha, tree = store.tree(repo_type, repo_id, rev)
            headers = {"X-Repo-Commit": sha}
            if path not in tree:
                raise_headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": f"{path} not found", **headers}
                return self._json({"error": "Entry not found"}, 404, raise_headers)
            data = store.blob(repo_type, repo_id, tree[path])
            headers["ETag"] = f'"{tree[path]}"'
            headers["Accept-Ranges"] = "bytes"
            status, body = 200, data
            range_header = self.headers.get("Range", "")
            if range_header.startswith("bytes="):
                start_s, _, end_s = range_header[6:].partition("-")
                start, end = int(start_s or 0), int(end_s) if end_s else len(data) - 1
                status, body = 206, data[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(status, body, headers, "application/octet-stream")

    return Handler


@contextlib.contextmanager
def running_hub_server(root: Path | None = None, token: str = TOKEN) -> Iterator[HubServer]:
    """Serve a fresh Hub on a free loopback port until the block ends."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ftw-hub-")))
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
        hub = HubServer(f"http://127.0.0.1:{httpd.server_address[1]}", token, RepoStore(Path(root)))
        httpd.RequestHandlerClass = _make_handler(hub)
        httpd.daemon_threads = True
        thread = threading.Thread(target=httpd.serve_forever, name="hubserver", daemon=True)
        thread.start()
        try:
            yield hub
        finally:
            httpd.shutdown()
            httpd.server_close()


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory) -> Iterator[HubServer]:
    """One local Hub for the session; tests use their own repo ids."""
    with running_hub_server(tmp_path_factory.mktemp("hub")) as hub:
        yield hub
