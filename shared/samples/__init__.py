"""Bundled sample data: an original, synthetic DialogSum-style set, written by
``scripts/generate_sample.py``.

The real DialogSum corpus is CC BY-NC-SA, so it never ships with the project; where an operator
has a local copy, :func:`dialogsum_path` prefers it.
"""

from __future__ import annotations

import os
from pathlib import Path

SAMPLE_PATH = Path(__file__).with_name("dialogsum_sample.jsonl")
# Repository root = the folder that holds the ``shared`` package.
_REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def dialogsum_path(split: str = "train") -> Path:
    """Return the JSONL file of a DialogSum split, or the bundled sample if it isn't present.

    The corpus folder is ``$LORAFLEET_DIALOGSUM_DIR``, defaulting to ``<repo>/../shared/data/
    dialogsum``. (Read here rather than in ``shared.settings`` so this stays import-light for
    tests and scripts that don't need the full settings.)

    Args:
        split: split name, e.g. ``"train"``, ``"validation"`` or ``"test"``.

    Returns:
        ``<dir>/<split>.jsonl`` when that file exists, else :data:`SAMPLE_PATH`.
    """
    default = _REPO_ROOT.parent / "shared" / "data" / "dialogsum"
    path = Path(os.environ.get("LORAFLEET_DIALOGSUM_DIR", default)) / f"{split}.jsonl"
    return path if path.is_file() else SAMPLE_PATH
