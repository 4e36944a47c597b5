"""Hub publishing through the real huggingface_hub client against tests/hubserver.py."""

from __future__ import annotations

import json

import pytest

from tests.publish.conftest import BASE_MODEL_ID, ENV_SECRET, make_job, make_run_dir, plan_for
from worker.errors import PublishError
from worker.publish import publish_run, pull
from worker.publish.card import LOCAL_PATH
from worker.publish.manifest import Manifest


@pytest.fixture
def hub_env(env, hub_server):
    yield {**env, "HF_ENDPOINT": hub_server.endpoint_url, "HF_TOKEN": hub_server.token}
    hub_server.faults.clear()  # a test that failed midway leaves no armed fault to the session's Hub


def test_adapter_commit_card_and_config(tiny_adapter, tmp_path, hub_env, hub_server, volume):
    run = make_run_dir(tmp_path, tiny_adapter, merged=True)
    job = make_job(
        "hub-1",
        outputs={"hub": {"repo_id": "team/tiny-lora"}},
        publish=["adapter", "merged"],
        credentials={"aws_secret_access_key": "job-aws-secret-xyz"},
    )
    (record,) = publish_run(run, plan_for(job, hub_env))

    commits = hub_server.commits("team/tiny-lora")
    assert len(commits) == 2  # the repo's initial commit + exactly one for this publish
    assert record["commit"] == commits[0]["sha"] and record["target"] == "hub" and record["revision"] == "main"
    assert hub_server.store.meta("model", "team/tiny-lora")["private"] is True
    tree = commits[0]["tree"]
    adapter_files = {p.relative_to(run / "adapter").as_posix() for p in (run / "adapter").rglob("*") if p.is_file()}
    assert adapter_files | {"README.md", "loss.png", "manifest.json"} <= set(tree)
    assert {f"merged/{f}" for f in adapter_files} | {"merged/manifest.json"} <= set(tree)

    config = json.loads(hub_server.store.blob("model", "team/tiny-lora", tree["adapter_config.json"]))
    assert config["base_model_name_or_path"] == BASE_MODEL_ID
    manifest = Manifest.from_bytes(hub_server.store.blob("model", "team/tiny-lora", tree["manifest.json"]))
    assert manifest.sha256 == record["sha256_manifest"]

    card = hub_server.store.blob("model", "team/tiny-lora", tree["README.md"]).decode()
    for secret in (hub_server.token, "job-aws-secret-xyz", ENV_SECRET, hub_env["BUCKET_SECRET_ACCESS_KEY"]):
        assert secret not in card
    for local in (str(tmp_path), str(volume), "/tmp"):
        assert local not in card
    assert not LOCAL_PATH.search(card), LOCAL_PATH.search(card)
    assert f"base_model: {BASE_MODEL_ID}" in card and "tatsu-lab/alpaca" in card
    assert "| final_loss | 1.2345 |" in card and "![training loss](loss.png)" in card
    assert "AutoPeftModelForCausalLM" in card and "--enable-lora" in card and "merged/" in card

    merged = pull("hf://team/tiny-lora", hub_env, kind="merged")
    assert Manifest.of_folder(merged.path).files == Manifest.of_folder(run / "merged").files


def test_branch_revision_and_pull_back(tiny_adapter, tmp_path, hub_env, hub_server):
    run = make_run_dir(tmp_path, tiny_adapter)
    job = make_job("hub-2", outputs={"hub": {"repo_id": "team/branchy", "private": False, "revision": "exp/v1"}})
    (first,) = publish_run(run, plan_for(job, hub_env))
    (second,) = publish_run(run, plan_for(job, hub_env))  # same content again: no new files, same commit
    assert first["revision"] == "exp/v1" and second["commit"] == first["commit"]
    assert [c["sha"] for c in hub_server.commits("team/branchy", "exp/v1")][0] == first["commit"]
    assert len(hub_server.commits("team/branchy", "main")) == 1  # main untouched

    pulled = pull("hf://team/branchy@exp/v1", hub_env)
    assert pulled.manifest_sha256 == first["sha256_manifest"] and not pulled.cached
    assert json.loads((pulled.path / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_MODEL_ID
    assert pull("team/branchy@exp/v1", hub_env).cached


def test_bad_token_fails_with_a_hint_and_no_commit(tiny_adapter, tmp_path, hub_env, hub_server):
    run = make_run_dir(tmp_path, tiny_adapter)
    job = make_job("hub-3", outputs={"hub": {"repo_id": "team/denied"}})
    with pytest.raises(PublishError) as err:
        publish_run(run, plan_for(job, {**hub_env, "HF_TOKEN": "hf_wrong_token_123"}))
    assert "HF_TOKEN" in err.value.hint and not err.value.retryable
    assert "hf_wrong_token_123" not in json.dumps(err.value.as_result())
    assert not hub_server.store.exists("model", "team/denied")


def test_hub_answers_worth_a_retry_are_retried_and_refusals_are_not(tiny_adapter, tmp_path, hub_env, hub_server):
    """One rule for publish and pull: network errors, 5xx, 408 and 429 are retried; any other 4xx is the
    Hub saying no, so it fails at once (and the job is not marked worth resubmitting as is)."""

    def commit_posts() -> int:
        return sum(
            1
            for method, path in hub_server.requests
            if method == "POST" and path.startswith("/api/models/team/flaky/commit/")
        )

    run = make_run_dir(tmp_path, tiny_adapter)
    hub_server.fail_next("/api/models/team/flaky/commit/", 503, times=2)
    (record,) = publish_run(run, plan_for(make_job("hub-flaky", outputs={"hub": {"repo_id": "team/flaky"}}), hub_env))
    assert record["commit"] == hub_server.commits("team/flaky")[0]["sha"] and commit_posts() == 3

    (run / "adapter" / "extra.txt").write_text("a change, so that a new commit is needed")
    hub_server.fail_next("/api/models/team/flaky/commit/", 422)  # one refusal: a retry would get through
    with pytest.raises(PublishError) as err:
        publish_run(run, plan_for(make_job("hub-flaky", outputs={"hub": {"repo_id": "team/flaky"}}), hub_env))
    assert commit_posts() == 4 and err.value.details["http_status"] == 422 and not err.value.retryable

    hub_server.fail_next("/api/models/team/flaky", 429)
    assert pull("team/flaky", hub_env).manifest_sha256 == record["sha256_manifest"]
    hub_server.fail_next("/api/models/team/flaky", 403)
    asked = len(hub_server.requests)
    with pytest.raises(PublishError, match="cannot read"):
        pull("team/flaky", hub_env)
    assert len(hub_server.requests) == asked + 1


def test_missing_token_is_named(tiny_adapter, tmp_path, hub_env):
    run = make_run_dir(tmp_path, tiny_adapter)
    env = {k: v for k, v in hub_env.items() if k != "HF_TOKEN"}
    with pytest.raises(PublishError, match="no Hugging Face token"):
        publish_run(run, plan_for(make_job("hub-4", outputs={"hub": {"repo_id": "team/none"}}), env))


def test_pull_of_a_repo_not_published_by_ftw_is_cached_by_commit(hub_env, hub_server):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub_server.endpoint_url, token=hub_server.token)
    api.create_repo("other/plain", private=True)
    api.create_commit(
        "other/plain",
        operations=[
            CommitOperationAdd("adapter_config.json", b'{"r": 8}'),
            CommitOperationAdd("sub/w.bin", b"w" * 1000),
        ],
        commit_message="m",
    )
    first = pull("other/plain", hub_env)
    assert first.manifest_sha256 is None and not first.cached
    assert (first.path / "sub" / "w.bin").read_bytes() == b"w" * 1000 and not (first.path / ".cache").exists()
    assert pull("hf://other/plain@main", hub_env).path == first.path
    with pytest.raises(PublishError, match="cannot read"):
        pull("other/plain", {k: v for k, v in hub_env.items() if k != "HF_TOKEN"})  # private: a token is needed


@pytest.mark.parametrize(
    "folder, expected",
    [
        ("hub-cache/models--meta-llama--Llama-3-8B/snapshots/0123abcd", "meta-llama/Llama-3-8B"),
        ("models/my-own-base", None),
    ],
)
def test_local_base_model_and_data_never_leak_their_paths(
    tiny_adapter, tmp_path, hub_env, hub_server, volume, folder, expected
):
    run = make_run_dir(tmp_path, tiny_adapter)
    base = volume / folder
    data = volume / "data" / "private-set.jsonl"
    repo = f"team/local-{expected is None}"
    job = make_job(
        "hub-local",
        outputs={"hub": {"repo_id": repo}},
        env=hub_env,
        base_model=str(base),
        datasets=[{"path": str(data), "type": "alpaca"}],
    )
    (record,) = publish_run(run, plan_for(job, hub_env))
    tree = hub_server.commits(repo)[0]["tree"]
    card = hub_server.store.blob("model", repo, tree["README.md"]).decode()
    config = json.loads(hub_server.store.blob("model", repo, tree["adapter_config.json"]))
    assert str(volume) not in card and not LOCAL_PATH.search(card)
    assert "private-set.jsonl (local file)" in card
    if expected:
        assert config["base_model_name_or_path"] == expected and f"base_model: {expected}" in card
        assert "warnings" not in record
    else:
        assert config["base_model_name_or_path"] == "my-own-base" and "base_model:" not in card
        assert any("local folder" in w for w in record["warnings"])
