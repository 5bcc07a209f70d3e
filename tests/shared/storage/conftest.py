"""Both stores, as a fixture parameter: every test of the interface runs on a folder and on a
real S3 server (SeaweedFS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.storage import Store, make_store
from tests.support.seaweedfs import SeaweedFS


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "file":
        yield make_store(f"file://{tmp_path / 'storage'}")
        return
    server: SeaweedFS = request.getfixturevalue("seaweedfs")
    bucket = server.new_bucket()
    yield make_store(f"s3://{bucket}/some/prefix", endpoint_url=server.endpoint_url,
                     path_style=True)
    server.drop_bucket(bucket)
