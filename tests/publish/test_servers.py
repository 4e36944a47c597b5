"""The loopback S3 and Hub test servers answer the real clients (boto3, huggingface_hub)."""

from __future__ import annotations

import pytest


def test_s3_server_round_trip(s3_server):
    endpoint, key, secret, root = s3_server.endpoint_url, s3_server.key, s3_server.secret, s3_server.root_dir
    bucket = s3_server.make_bucket("servers-roundtrip")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="a/b.txt")["Body"].read() == b"hello"
    assert (root / bucket / "a" / "b.txt").read_bytes() == b"hello"
    assert endpoint.startswith("http://127.0.0.1:") and key and secret


def test_s3_server_refuses_a_wrong_secret(s3_server):
    import boto3
    from botocore.exceptions import ClientError

    bad = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.key,
        aws_secret_access_key="wrong",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError):
        bad.list_buckets()


def test_hub_server_commit_and_download(hub_server, tmp_path):
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

    endpoint, token = hub_server
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo("tester/servers", private=True)
    info = api.create_commit(
        "tester/servers", operations=[CommitOperationAdd("x/y.txt", b"payload")], commit_message="m"
    )
    assert api.model_info("tester/servers").sha == info.oid == hub_server.commits("tester/servers")[0]["sha"]
    path = hf_hub_download("tester/servers", "x/y.txt", endpoint=endpoint, token=token, cache_dir=tmp_path)
    assert open(path, "rb").read() == b"payload"
    with pytest.raises(Exception, match="401|Repository Not Found"):  # private: no token, no read
        hf_hub_download("tester/servers", "x/y.txt", endpoint=endpoint, token=False, cache_dir=tmp_path / "anon")
