"""The README's "Migrating from OpenAI" script runs as written against a real API, worker and
inference engine: only its address, key, base model and data files are this test's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.engine.conftest import ServingStack
from tests.support import dialogsum_records
from tests.test_readme import code_blocks, section

pytestmark = pytest.mark.e2e

SERVING_SETTINGS = {"engine_backend": "builtin"}  # the script's calls, not vLLM, are the point


def migration_script() -> str:
    blocks = [b for b in code_blocks(section("Migrating from OpenAI")) if "OpenAI(" in b]
    assert len(blocks) == 1, "the migration page has one script"
    return blocks[0]


def adapted(code: str, replacements: dict[str, str]) -> str:
    """``code`` with each of ``replacements`` made; each must occur exactly once, so that the
    test fails when the README's script changes under it."""
    for old, new in replacements.items():
        assert code.count(old) == 1, f"the migration script should contain {old} once"
        code = code.replace(old, new)
    return code


def write_chat_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """DialogSum records as OpenAI's chat fine-tuning lines."""
    lines = [{"messages": [{"role": "user", "content": r["dialogue"]},
                           {"role": "assistant", "content": r["summary"]}]} for r in records]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_migration_script_runs_against_lorafleet(
        serving: ServingStack, tiny_model: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    stack = serving.stack
    monkeypatch.chdir(tmp_path)
    write_chat_jsonl(tmp_path / "train.jsonl", dialogsum_records(24))
    write_chat_jsonl(tmp_path / "valid.jsonl", dialogsum_records(4, split="validation"))
    code = adapted(migration_script(), {
        '"http://127.0.0.1:8000/v1"': repr(f"{stack.base_url}/v1"),
        '"HuggingFaceTB/SmolLM2-135M-Instruct"': repr(str(tiny_model)),
    })
    ran: dict[str, Any] = {"KEY": stack.key, "__name__": "readme"}

    exec(compile(code, "README.md (Migrating from OpenAI)", "exec"), ran)  # noqa: S102

    job, more, client = ran["job"], ran["more"], ran["client"]
    assert job.status == "succeeded", job.error
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any("paused" in m.lower() for m in events), events
    assert job.validation_file == ran["validation"].id and job.metadata == {"team": "support"}
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert isinstance(ran["reply"].choices[0].message.content, str)
    assert client.fine_tuning.jobs.retrieve(more.id).status == "cancelled"
    assert client.fine_tuning.jobs.retrieve(more.id).model_extra["initial_model"] == (
        job.fine_tuned_model)
    deleted = client.fine_tuning.jobs.retrieve(job.id)
    assert deleted.model_extra["fine_tuned_model_deleted_at"] is not None
    assert job.fine_tuned_model not in [m.id for m in client.models.list()]
