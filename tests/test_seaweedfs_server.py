"""The tests' S3 server (tests/support/seaweedfs.py): a real SeaweedFS that keeps objects
across a restart, honours conditional creates, and leaves no process behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.support.seaweedfs import SeaweedFS


def test_session_server_stores_objects_in_separate_buckets(seaweedfs: SeaweedFS,
                                                           s3_bucket: str) -> None:
    other = seaweedfs.new_bucket()
    client = seaweedfs.client()
    client.put_object(Bucket=s3_bucket, Key="a/one", Body=b"1")
    client.put_object(Bucket=other, Key="a/two", Body=b"2")
    assert seaweedfs.keys(s3_bucket) == ["a/one"]
    assert seaweedfs.keys(other) == ["a/two"]
    seaweedfs.drop_bucket(other)
    assert other not in {b["Name"] for b in client.list_buckets()["Buckets"]}


def test_conditional_create_refuses_an_existing_key(seaweedfs: SeaweedFS,
                                                    s3_bucket: str) -> None:
    client = seaweedfs.client()
    client.put_object(Bucket=s3_bucket, Key="manifest", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        client.put_object(Bucket=s3_bucket, Key="manifest", Body=b"second", IfNoneMatch="*")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=s3_bucket, Key="manifest")["Body"].read() == b"first"


def test_own_server_restarts_on_its_ports_with_its_objects(tmp_path: Path) -> None:
    import psutil

    server = SeaweedFS(tmp_path / "s3").start()
    try:
        bucket = server.new_bucket()
        server.client().put_object(Bucket=bucket, Key="kept", Body=b"x")
        endpoint, pid = server.endpoint_url, server.pid
        assert pid is not None
        server.stop()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        server.start()
        assert server.endpoint_url == endpoint
        assert server.keys(bucket) == ["kept"]
        assert server.env(bucket, "p")["LORAFLEET_STORAGE_URL"] == f"s3://{bucket}/p"
    finally:
        server.kill()
    assert not server.alive()
