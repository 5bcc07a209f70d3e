"""The README agrees with the code: every setting, job field, record shape, prompt format and
CLI command it documents exists, and everything that exists is documented.

When a setting is added, the failure message prints the missing table rows, ready to paste
(``python tests/test_readme.py`` prints the whole table).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic.fields import FieldInfo

from cli.main import build_parser
from shared.records import SHAPES
from shared.schemas import JobCreate, LoraSpec
from shared.settings import Settings
from shared.templates import FORMAT_NAMES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PREFIX = str(Settings.model_config.get("env_prefix", "")).upper()

# LORAFLEET_* names the README may mention that are not settings: read by the CLI or the
# tests directly, or interpolated by docker compose.
NOT_SETTINGS = {
    "LORAFLEET_API_KEY",
    "LORAFLEET_WORKER_GPU_IDS",
    "LORAFLEET_VLLM_GPU_IDS",
    "LORAFLEET_VLLM_MODEL",
    "LORAFLEET_S3_ACCESS_KEY",
    "LORAFLEET_S3_SECRET_KEY",
    "LORAFLEET_TEST_POSTGRES_URL",
    "LORAFLEET_TEST_REDIS_URL",
    "LORAFLEET_DIALOGSUM_DIR",
}
# Settings whose Field has no description of its own.
FALLBACK_DESCRIPTIONS = {
    "host": "Interface the API server listens on (`0.0.0.0` in a container).",
    "port": "Port of the API server.",
}
ROW = re.compile(r"^\|\s*`(?P<name>[A-Za-z0-9_.]+)`\s*\|\s*(?P<default>.*?)\s*\|(?P<rest>.*)\|\s*$")


# --------------------------------------------------------------------------- helpers
def env_name(field: str) -> str:
    return PREFIX + field.upper()


def format_default(value: Any) -> str:
    """A default as the README's table shows it."""
    if value is None:
        return "(unset)"
    if value == "" or value == Path(""):
        return "(empty)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def table_row(name: str, info: FieldInfo) -> str:
    description = (info.description or FALLBACK_DESCRIPTIONS.get(name, "")).replace("|", "\\|")
    return f"| `{env_name(name)}` | {format_default(info.default)} | {description} |"


def settings_table() -> str:
    head = "| Variable | Default | Description |\n| --- | --- | --- |"
    rows = [table_row(name, info) for name, info in Settings.model_fields.items()]
    return "\n".join([head, *rows])


def readme() -> str:
    return README.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading."""
    text = readme()
    m = re.search(rf"^## {re.escape(title)}\s*$", text, flags=re.M)
    assert m, f"README has no '## {title}' section"
    end = re.search(r"^## ", text[m.end():], flags=re.M)
    return text[m.end(): m.end() + end.start()] if end else text[m.end():]


def table_rows(text: str) -> dict[str, str]:
    """``{first column name: second column}`` of the markdown table rows in ``text``."""
    rows = {}
    for line in text.splitlines():
        if m := ROW.match(line.strip()):
            rows[m["name"]] = m["default"]
    return rows


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)


# --------------------------------------------------------------------------- settings
def test_every_setting_is_in_the_configuration_table() -> None:
    rows = table_rows(section("Configuration"))
    missing = [name for name in Settings.model_fields if env_name(name) not in rows]
    paste = "\n".join(table_row(n, Settings.model_fields[n]) for n in missing)
    assert not missing, f"README's configuration table lacks these settings:\n{paste}"


def test_configuration_table_names_only_real_settings() -> None:
    rows = table_rows(section("Configuration"))
    known = {env_name(name) for name in Settings.model_fields}
    assert set(rows) - known == set(), "the table documents settings that do not exist"


def test_configuration_defaults_match_the_code() -> None:
    rows = table_rows(section("Configuration"))
    wrong = {
        env_name(name): (rows[env_name(name)], format_default(info.default))
        for name, info in Settings.model_fields.items()
        if env_name(name) in rows and rows[env_name(name)] != format_default(info.default)
    }
    assert wrong == {}, "README default differs from the code: {name: (readme, code)}"


def test_every_lorafleet_variable_mentioned_exists() -> None:
    mentioned = set(re.findall(r"\bLORAFLEET_[A-Z0-9_]*[A-Z0-9]\b", readme()))
    known = {env_name(name) for name in Settings.model_fields} | NOT_SETTINGS
    assert mentioned - known == set(), "README mentions variables that nothing reads"


# --------------------------------------------------------------------------- quick start
def test_quick_start_is_make_demo_then_make_test() -> None:
    blocks = code_blocks(section("Quick start"))
    assert blocks, "the Quick start section has no code block"
    commands = [ln.strip() for ln in blocks[0].splitlines() if ln.strip()]
    assert commands == ["make demo", "make test"]


@pytest.mark.parametrize("target", ["venv", "demo", "test", "lint", "clean"])
def test_documented_make_targets_exist(target: str) -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{target}:", makefile, flags=re.M), f"Makefile has no '{target}' target"
    assert f"make {target}" in readme()


# --------------------------------------------------------------------------- job fields
def test_every_job_field_is_documented() -> None:
    rows = table_rows(section("Job request fields"))
    fields = set(JobCreate.model_fields) | {f"lora.{n}" for n in LoraSpec.model_fields}
    assert fields - set(rows) == set(), "job request fields missing from the README"
    assert set(rows) - fields == set(), "README documents job fields that do not exist"


def test_job_field_defaults_match_the_code() -> None:
    rows = table_rows(section("Job request fields"))
    simple = {**{n: f for n, f in JobCreate.model_fields.items() if not f.is_required()},
              **{f"lora.{n}": f for n, f in LoraSpec.model_fields.items()}}
    wrong = {}
    for name, info in simple.items():
        if info.default_factory is not None or name not in rows:
            continue
        if rows[name] != format_default(info.default):
            wrong[name] = (rows[name], format_default(info.default))
    assert wrong == {}, "README default differs from the code: {field: (readme, code)}"


# --------------------------------------------------------------------------- data
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_record_shapes_are_documented(shape: str) -> None:
    text = section("Training data")
    required, _ = SHAPES[shape]
    assert f"`{shape}`" in text
    for col in required:
        assert f"`{col}`" in text, f"column '{col}' of shape {shape} is not documented"


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_prompt_formats_are_documented(fmt: str) -> None:
    assert f"`{fmt}`" in section("Prompt formats")


# --------------------------------------------------------------------------- CLI
def _subcommands() -> dict[str, list[str]]:
    """``{command: [actions]}`` of the ``lorafleet`` parser."""
    import argparse

    def choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    return {name: sorted(choices(sub)) for name, sub in choices(build_parser()).items()}


def test_every_cli_command_is_documented() -> None:
    text = section("Command line")
    missing = []
    for command, actions in _subcommands().items():
        wanted = [f"lorafleet {command} {a}" for a in actions] or [f"lorafleet {command}"]
        missing += [w for w in wanted if w not in text]
    assert missing == [], "CLI commands missing from the README's command line section"


def test_readme_names_only_real_cli_commands() -> None:
    commands = _subcommands()
    for m in re.finditer(r"\blorafleet ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", readme()):
        command, action = m.group(1), m.group(2)
        if command not in commands:
            continue  # prose ("lorafleet stores ..."), not a command
        if commands[command] and action is not None:
            assert action in commands[command], f"'lorafleet {command} {action}' does not exist"


if __name__ == "__main__":
    print(settings_table())
