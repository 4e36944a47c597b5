"""Publishing to the Hugging Face Hub: one commit per publish, a model card, the commit sha back.

The token comes from the job's credentials.hf_token or the endpoint's HF_TOKEN; HF_ENDPOINT points
the client elsewhere (tests, mirrors). The repo is created when missing (private unless the job
says otherwise) and the branch when `revision` names one that does not exist yet. One
`create_commit` carries everything: the adapter (or full model) at the repo root with
adapter_config.json's base_model_name_or_path set to the base model's Hub id, the model card as
README.md (replacing peft's), loss.png, manifest.json (sha256 of every file as committed), and a
merged model under `merged/` when asked. A commit is atomic on the Hub, so a failed publish changes nothing there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from schemas.config import TrainingConfig
from schemas.job import Credentials, HubOutput
from schemas.secrets import Redactor
from worker.errors import PublishError
from worker.publish.card import base_model_id, model_card, public_name
from worker.publish.manifest import MANIFEST_NAME, Manifest, folder_files, sha256_file
from worker.publish.transfer import Fatal, TransferSettings, with_retries

T = TypeVar("T")

MERGED_DIR = "merged"


@dataclass(frozen=True)
class HubTarget:
    repo_id: str
    private: bool
    revision: str | None
    token: str | None = field(repr=False)
    endpoint: str | None = None

    @classmethod
    def resolve(cls, outputs_hub: HubOutput, credentials: Credentials, env: Mapping[str, str]) -> HubTarget:
        """The job's repo with the job's token, else the endpoint's (HF_TOKEN)."""
        job_token = credentials.hf_token.get_secret_value() if credentials.hf_token is not None else None
        token = job_token or env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None
        return cls(
            outputs_hub.repo_id, outputs_hub.private, outputs_hub.revision, token, env.get("HF_ENDPOINT") or None
        )


def _operations(root: Path, prefix: str, replace: dict[str, bytes]) -> tuple[list[Any], Manifest]:
    """Commit operations for the files of `root` (with `replace` overriding or adding files) under
    `prefix`, and their manifest as committed."""
    from huggingface_hub import CommitOperationAdd

    contents: dict[str, bytes | Path] = {p.relative_to(root).as_posix(): p for p in folder_files(root)}
    contents.update(replace)
    ops, files = [], {}
    for rel, content in sorted(contents.items()):
        if isinstance(content, bytes):
            ops.append(CommitOperationAdd(f"{prefix}{rel}", content))
            files[rel] = {"size": len(content), "sha256": Manifest.bytes_sha256(content)}
        else:
            ops.append(CommitOperationAdd(f"{prefix}{rel}", str(content)))
            files[rel] = {"size": content.stat().st_size, "sha256": sha256_file(content)}
    manifest = Manifest(files)
    ops.append(CommitOperationAdd(f"{prefix}{MANIFEST_NAME}", manifest.to_bytes()))
    return ops, manifest


def adapter_config_for_hub(adapter_dir: Path, base_id: str | None, base_name: str) -> dict[str, bytes]:
    """adapter_config.json with base_model_name_or_path = the base model's Hub id, or (a local base
    model with no known id) its folder name: never a local path."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base_id or Path(base_name.removeprefix("file://")).name
    return {"adapter_config.json": (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()}


def hub_status(e: BaseException) -> int | None:
    """The HTTP status of a Hub answer that raised, None for a network error."""
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(e, "response", None) if isinstance(e, HfHubHTTPError) else None
    return getattr(response, "status_code", None)


def refused(status: int | None) -> bool:
    """The Hub said no (no access, no such repo, a bad request): asking again gets the same answer.
    Network errors, 5xx, 408 and 429 are worth another try."""
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def hub_call(fn: Callable[[], T], what: str, transfer: TransferSettings) -> T:
    """`fn` with the transfer's retries; a refusal is raised at once."""

    def call() -> T:
        try:
            return fn()
        except Exception as e:
            if refused(hub_status(e)):
                raise Fatal(e) from e
            raise

    return with_retries(call, what, transfer)


def _hub_error(e: Exception, target: HubTarget) -> PublishError:
    status = hub_status(e)
    hints = {
        401: "the Hub refused the token: set HF_TOKEN on the endpoint (or credentials.hf_token) to a token with "
        "write access",
        403: f"the token may not write to {target.repo_id.split('/')[0]}: use a write token of that user/organization",
        404: f"{target.repo_id} was not found for this token: check outputs.hub.repo_id",
    }
    err = PublishError(
        f"Hub publish to {target.repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
        hints.get(status or 0, "the Hub or the network failed; resubmit the same run_id to publish again"),
        details={"repo_id": target.repo_id, **({"http_status": status} if status else {})},
    )
    err.retryable = not refused(status)
    return err


def publish_hub(
    target: HubTarget,
    cfg: TrainingConfig,
    run_id: str,
    run_dir: Path,
    main_dir: Path,
    main_kind: str,
    merged_dir: Path | None,
    redactor: Redactor,
    settings: TransferSettings,
) -> dict[str, Any]:
    """One commit to the Hub; the artifact record with the commit sha."""
    from huggingface_hub import HfApi

    if not target.token:
        raise PublishError(
            f"no Hugging Face token to publish to {target.repo_id}",
            "set HF_TOKEN on the endpoint, or send credentials.hf_token with the job",
        )
    api = HfApi(endpoint=target.endpoint, token=target.token)
    base_id = base_model_id(cfg.base_model)
    loss_png = run_dir / "loss.png"
    card = model_card(
        cfg,
        target.repo_id,
        run_id,
        run_dir,
        base_id=base_id,
        has_loss_png=loss_png.is_file(),
        merged_path=MERGED_DIR if merged_dir is not None else None,
        redactor=redactor,
    )
    # the card replaces the README peft writes; loss.png sits beside it
    replace = {"README.md": card.encode(), **({"loss.png": loss_png.read_bytes()} if loss_png.is_file() else {})}
    if main_kind == "adapter":
        replace.update(adapter_config_for_hub(main_dir, base_id, cfg.base_model))
    ops, manifest = _operations(main_dir, "", replace)
    if merged_dir is not None:
        ops += _operations(merged_dir, f"{MERGED_DIR}/", {})[0]
    branch = target.revision or "main"

    def commit() -> Any:
        api.create_repo(target.repo_id, private=target.private, exist_ok=True)
        if branch != "main":
            api.create_branch(target.repo_id, branch=branch, exist_ok=True)
        return api.create_commit(
            target.repo_id, operations=ops, revision=branch, commit_message=f"ftw: publish {main_kind} of run {run_id}"
        )

    try:
        info = hub_call(commit, f"Hub commit to {target.repo_id}", settings)
    except Exception as e:
        raise _hub_error(e, target) from e
    record = {
        "kind": main_kind,
        "target": "hub",
        "uri": f"hf://{target.repo_id}",
        "revision": branch,
        "commit": info.oid,
        "sha256_manifest": manifest.sha256,
        "files": len(manifest.files),
        "bytes": manifest.total_bytes,
        **({"merged_path": MERGED_DIR} if merged_dir is not None else {}),
    }
    if base_id is None and main_kind == "adapter":
        record["warnings"] = [
            f"the base model is a local folder ({public_name(cfg.base_model)}): adapter_config.json names it "
            "by its folder name, which servers cannot resolve; train from a Hub id to fix this"
        ]
    return record
