"""Upload validation: every problem is reported with the line it is on."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from shared.errors import InvalidDataset, PayloadTooLarge
from shared.files import validate_jsonl

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
    from shared.files import open_content, save_upload
    from shared.settings import get_settings

    content = (line(GOOD) + "\n").encode()
    row = save_upload(session, io.BytesIO(content), "../../etc/data.jsonl", "fine-tune", "p1")

    assert (row.filename, row.bytes, row.line_count, row.record_format, row.project) == (
        "data.jsonl", len(content), 1, "dialogsum", "p1")
    assert open_content(row).read_bytes() == content
    assert stored_files(get_settings()) == [f"{row.id}.jsonl"]


def test_save_upload_over_the_size_limit_keeps_nothing(session: Session) -> None:
    from shared.files import save_upload
    from shared.settings import get_settings

    content = (line(GOOD) + "\n").encode() * 20  # > 1000 bytes

    with pytest.raises(PayloadTooLarge, match="larger than the limit of 1000 bytes"):
        save_upload(session, io.BytesIO(content), "big.jsonl", "fine-tune")
    assert stored_files(get_settings()) == []


def test_save_upload_of_an_invalid_file_keeps_nothing(session: Session) -> None:
    from shared.files import save_upload
    from shared.settings import get_settings

    with pytest.raises(InvalidDataset, match="line 2"):
        save_upload(session, io.BytesIO(b'{"a": 1}\nnot json\n'), "bad.jsonl", "fine-tune")
    assert stored_files(get_settings()) == []


def test_save_upload_rejects_an_unknown_purpose(session: Session) -> None:
    from shared.files import save_upload

    with pytest.raises(InvalidDataset, match="purpose must be one of fine-tune") as exc:
        save_upload(session, io.BytesIO(b'{"a": 1}\n'), "x.jsonl", "assistants")
    assert exc.value.param == "purpose"
