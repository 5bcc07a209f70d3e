"""One stack for every API test: its worker trains the few jobs they create, one at a time.

The upload limit is small so that the 413 path is reachable with a modest file; the other tests
upload well under it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.stack import Stack, StackFactory

UPLOAD_LIMIT = 100_000  # bytes; 64 DialogSum records are about 60 kB


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    factory = StackFactory(tmp_path_factory, "api-stack")
    yield factory(settings={"max_upload_bytes": UPLOAD_LIMIT})
    factory.close()
