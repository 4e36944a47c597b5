"""The local test Hub's repositories (tests/hubserver.py serves them): content-addressed commits and blobs on disk.

Each repository is a folder: objects/<git blob sha1> holds the files' bytes, commits/<sha>.json each commit
(parent, tree of path -> blob sha, message; its sha is the sha1 of that record), refs.json the branches and
meta.json its visibility. A new repository starts with one commit of .gitattributes, as the Hub's do; a
`HubError` carries the status, message and X-Error-Code the server answers with when a call cannot be done.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str = "", **body: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class RepoStore:
    """Repos as JSON commits + blobs on disk: objects/<sha1>, commits/<sha>.json, refs.json, meta.json."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()

    def _dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / repo_type / repo_id

    def exists(self, repo_type: str, repo_id: str) -> bool:
        return (self._dir(repo_type, repo_id) / "meta.json").exists()

    def meta(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        if not self.exists(repo_type, repo_id):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads((self._dir(repo_type, repo_id) / "meta.json").read_text())

    def create(self, repo_type: str, repo_id: str, private: bool) -> None:
        with self.lock:
            if self.exists(repo_type, repo_id):
                raise HubError(409, "You already created this model repo")
            d = self._dir(repo_type, repo_id)
            (d / "objects").mkdir(parents=True)
            (d / "commits").mkdir()
            (d / "meta.json").write_text(json.dumps({"private": private, "created": time.time()}))
            (d / "refs.json").write_text("{}")
            gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            self._commit_locked(repo_type, repo_id, "main", "initial commit", {".gitattributes": gitattributes}, [])

    def refs(self, repo_type: str, repo_id: str) -> dict[str, str]:
        self.meta(repo_type, repo_id)
        return json.loads((self._dir(repo_type, repo_id) / "refs.json").read_text())

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        refs = self.refs(repo_type, repo_id)
        if revision in refs:
            return refs[revision]
        if len(revision) == 40 and (self._dir(repo_type, repo_id) / "commits" / f"{revision}.json").exists():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit_record(self, repo_type: str, repo_id: str, sha: str) -> dict[str, Any]:
        return json.loads((self._dir(repo_type, repo_id) / "commits" / f"{sha}.json").read_text())

    def tree(self, repo_type: str, repo_id: str, revision: str) -> tuple[str, dict[str, str]]:
        sha = self.resolve(repo_type, repo_id, revision)
        return sha, self.commit_record(repo_type, repo_id, sha)["tree"]

    def blob(self, repo_type: str, repo_id: str, blob_sha: str) -> bytes:
        return (self._dir(repo_type, repo_id) / "objects" / blob_sha).read_bytes()

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        message: str,
        files: dict[str, bytes],
        deletions: list[str],
        parent: str | None = None,
    ) -> str:
        with self.lock:
            refs = self.refs(repo_type, repo_id)
            if branch not in refs:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent is not None and parent != refs[branch]:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            return self._commit_locked(repo_type, repo_id, branch, message, files, deletions)

    def _commit_locked(
        self, repo_type: str, repo_id: str, branch: str, message: str, files: dict[str, bytes], deletions: list[str]
    ) -> str:
        d = self._dir(repo_type, repo_id)
        refs = json.loads((d / "refs.json").read_text())
        parent = refs.get(branch)
        tree = dict(self.commit_record(repo_type, repo_id, parent)["tree"]) if parent else {}
        for path in deletions:
            if path.endswith("/"):
                tree = {p: s for p, s in tree.items() if not p.startswith(path)}
            elif tree.pop(path, None) is None:
                raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
        for path, data in files.items():
            sha = git_blob_sha(data)
            (d / "objects" / sha).write_bytes(data)
            tree[path] = sha
        record = {"parent": parent, "tree": dict(sorted(tree.items())), "message": message, "time": time.time()}
        sha = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        (d / "commits" / f"{sha}.json").write_text(json.dumps(record))
        refs[branch] = sha
        (d / "refs.json").write_text(json.dumps(refs))
        return sha

    def create_branch(self, repo_type: str, repo_id: str, branch: str, starting_point: str | None) -> None:
        with self.lock:
            refs = self.refs(repo_type, repo_id)
            if branch in refs:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            refs[branch] = self.resolve(repo_type, repo_id, starting_point or "main")
            (self._dir(repo_type, repo_id) / "refs.json").write_text(json.dumps(refs))
