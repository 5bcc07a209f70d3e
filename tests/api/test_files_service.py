"""Upload validation: every problem is reported with the line it is on."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from api.files import validate_jsonl
from shared.errors import InvalidDataset, PayloadTooLarge

GOOD = {"dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet."}


@pytest.fixture
def settings(settings_env: Callable[..., Any]) -> Any:
    return settings_env()


def write(tmp_path: Path, *lines: str | bytes) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n"
                              for ln in lines))
    return path


def line(record: Any) -> str:
    return json.dumps(record)


def test_valid_file_reports_count_shape_and_columns(settings: Any, tmp_path: Path) -> None:
    path = write(tmp_path, line(GOOD), "", line({**GOOD, "topic": "t"}))

    assert validate_jsonl(path) == (2, "dialogsum", ["dialogue", "summary", "topic"])


def test_custom_columns_are_accepted_as_they_are(settings: Any, tmp_path: Path) -> None:
    path = write(tmp_path, line({"conversation": "c", "gist": "g"}), line({"other": 1}))

    assert validate_jsonl(path) == (2, "custom", ["conversation", "gist", "other"])


def test_malformed_json_names_the_line(settings: Any, tmp_path: Path) -> None:
    path = write(tmp_path, line(GOOD), line(GOOD), '{"dialogue": "x", "summary": ')

    with pytest.raises(InvalidDataset, match=r"^line 3: invalid JSON") as exc:
        validate_jsonl(path)
    assert exc.value.param == "file"


def test_empty_file(settings: Any, tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")

    with pytest.raises(InvalidDataset, match="empty"):
        validate_jsonl(path)


def test_blank_lines_only_count_as_empty(settings: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidDataset, match="empty"):
        validate_jsonl(write(tmp_path, "", "   ", ""))


def test_missing_column_of_the_files_shape_names_the_line(settings: Any, tmp_path: Path) -> None:
    path = write(tmp_path, line(GOOD), line(GOOD), line(GOOD), line({"dialogue": "only"}))

    with pytest.raises(InvalidDataset, match=r"^line 4: missing column 'summary'"):
        validate_jsonl(path)


def test_wrong_column_type_names_the_line(settings: Any, tmp_path: Path) -> None:
    path = write(tmp_path, line(GOOD), line({**GOOD, "summary": ["not", "text"]}))

    with pytest.raises(InvalidDataset, match=r"^line 2: column 'summary' must be a string"):
        validate_jsonl(path)


def test_bad_chat_message_names_the_line(settings: Any, tmp_path: Path) -> None:
    ok = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "u"}]}

    with pytest.raises(InvalidDataset, match=r"^line 2: the last message must have role"):
        validate_jsonl(write(tmp_path, line(ok), line(bad)))


@pytest.mark.parametrize("value", [[1, 2], "text", 42, None])
def test_non_object_line(settings: Any, tmp_path: Path, value: Any) -> None:
    path = write(tmp_path, line(GOOD), line(value))

    with pytest.raises(InvalidDataset, match=r"^line 2: expected a JSON object"):
        validate_jsonl(path)


def test_invalid_utf8_names_the_line(settings: Any, tmp_path: Path) -> None:
    path = write(tmp_path, line(GOOD), b'{"dialogue": "\xff\xfe", "summary": "s"}')

    with pytest.raises(InvalidDataset, match=r"^line 2: not valid UTF-8"):
        validate_jsonl(path)


def test_deeply_nested_json_is_an_error_not_a_crash(settings: Any, tmp_path: Path) -> None:
    path = write(tmp_path, "[" * 100_000 + "]" * 100_000)

    with pytest.raises(InvalidDataset, match=r"^line 1: "):
        validate_jsonl(path)


def test_record_over_the_length_limit(settings_env: Callable[..., Any], tmp_path: Path) -> None:
    settings_env(max_record_chars=200)
    path = write(tmp_path, line(GOOD), line({**GOOD, "dialogue": "x" * 500}))

    with pytest.raises(InvalidDataset, match=r"^line 2: record is \d+ characters, the limit is"):
        validate_jsonl(path)


def test_too_many_lines(settings_env: Callable[..., Any], tmp_path: Path) -> None:
    settings_env(max_upload_lines=3)
    path = write(tmp_path, *[line(GOOD)] * 4)

    with pytest.raises(PayloadTooLarge, match=r"^line 4: more than 3 lines"):
        validate_jsonl(path)


# --------------------------------------------------------------------------- save_upload
@pytest.fixture
def session(settings_env: Callable[..., Any]) -> Iterator[Session]:
    settings_env(max_upload_bytes=1000)
    from shared.db import get_sessionmaker
    from shared.migrate import upgrade

    upgrade()
    with get_sessionmaker()() as s:
        yield s


def stored_files(settings: Any) -> list[str]:
    folder = settings.storage_dir / "files"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_save_upload_stores_and_records_the_file(session: Session) -> None:
    from api.files import save_upload
    from shared.files import open_content
    from shared.settings import get_settings

    content = (line(GOOD) + "\n").encode()
    row = save_upload(session, io.BytesIO(content), "../../etc/data.jsonl", "fine-tune", "p1")

    assert (row.filename, row.bytes, row.line_count, row.record_format, row.project) == (
        "data.jsonl", len(content), 1, "dialogsum", "p1")
    assert open_content(row).read_bytes() == content
    assert stored_files(get_settings()) == [f"{row.id}.jsonl"]


def test_save_upload_over_the_size_limit_keeps_nothing(session: Session) -> None:
    from api.files import save_upload
    from shared.settings import get_settings

    content = (line(GOOD) + "\n").encode() * 20  # > 1000 bytes

    with pytest.raises(PayloadTooLarge, match="larger than the limit of 1000 bytes"):
        save_upload(session, io.BytesIO(content), "big.jsonl", "fine-tune")
    assert stored_files(get_settings()) == []


def test_save_upload_of_an_invalid_file_keeps_nothing(session: Session) -> None:
    from api.files import save_upload
    from shared.settings import get_settings

    with pytest.raises(InvalidDataset, match="line 2"):
        save_upload(session, io.BytesIO(b'{"a": 1}\nnot json\n'), "bad.jsonl", "fine-tune")
    assert stored_files(get_settings()) == []


def test_save_upload_rejects_an_unknown_purpose(session: Session) -> None:
    from api.files import save_upload

    with pytest.raises(InvalidDataset, match="purpose must be one of fine-tune") as exc:
        save_upload(session, io.BytesIO(b'{"a": 1}\n'), "x.jsonl", "assistants")
    assert exc.value.param == "purpose"


# --------------------------------------------------------------------------- list_files
def add_files(session: Session, purposes: str, project: str = "p") -> list[tuple[str, str]]:
    """Record a file of each purpose in ``purposes`` (oldest first); their (id, purpose),
    newest first, as the listing orders them. Uploads accept ``fine-tune`` only, so the rows
    of other purposes are written straight to the table."""
    from shared.ids import new_id, now
    from shared.models import File

    made = []
    for purpose in purposes.split():
        file_id = new_id("file")
        session.add(File(id=file_id, project=project, filename=f"{file_id}.jsonl",
                         purpose=purpose, bytes=1, created_at=now(),
                         path=f"files/{file_id}.jsonl", sha256="0" * 64))
        session.flush()  # one at a time: the listing orders by insertion
        made.append((file_id, purpose))
    return made[::-1]


def pages(session: Session, limit: int, purpose: str | None) -> list[tuple[list[str], bool]]:
    """Every page of the listing, each as (ids, has_more), following the ``after`` cursor."""
    from api.files import list_files

    found: list[tuple[list[str], bool]] = []
    after = None
    while True:
        rows, more = list_files(session, "p", after, limit, purpose)
        found.append(([r.id for r in rows], more))
        if not more or not rows:
            return found
        after = rows[-1].id


def test_a_purpose_is_filtered_before_the_page_is_cut(session: Session) -> None:
    files = add_files(session, "fine-tune batch fine-tune fine-tune batch batch fine-tune "
                               "batch batch batch fine-tune fine-tune batch fine-tune")
    add_files(session, "fine-tune batch", project="other")
    tuned = [i for i, purpose in files if purpose == "fine-tune"]
    batch = [i for i, purpose in files if purpose == "batch"]

    assert pages(session, 3, "fine-tune") == [
        (tuned[0:3], True), (tuned[3:6], True), (tuned[6:7], False)]
    assert pages(session, 7, "batch") == [(batch, False)]
    assert pages(session, 5, None) == [
        ([i for i, _ in files[0:5]], True), ([i for i, _ in files[5:10]], True),
        ([i for i, _ in files[10:14]], False)]
    assert pages(session, 3, "assistants") == [([], False)]


def test_a_page_of_one_purpose_may_follow_a_file_of_another(session: Session) -> None:
    from api.files import list_files

    files = add_files(session, "batch fine-tune batch fine-tune")

    rows, more = list_files(session, "p", files[0][0], 1, "batch")  # after the newest fine-tune

    assert ([r.id for r in rows], more) == ([files[1][0]], True)
