"""The trained adapter on disk: PEFT's files plus ``lorafleet.json``, the metadata that lets
inference wrap a request exactly as training did."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peft import PeftModel

from shared.schemas import TrainingSpec

ADAPTER_META = "lorafleet.json"


def save_adapter(model: PeftModel, spec: TrainingSpec, dest: Path, extra: dict[str, Any]) -> Path:
    """Save the final adapter in PEFT layout, plus the prompt format, then rename into place.

    Args:
        extra: more metadata for ``lorafleet.json`` (job id, model name, steps, tokens, the
            parity probe).

    Returns:
        ``dest``. The new adapter is written beside it and renamed into place, so ``dest``
        never holds a partly written adapter.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".adapter-"))
    # The job's adapter only: a DPO job that continues an adapter also holds its frozen copy.
    model.save_pretrained(str(tmp), safe_serialization=True,
                          selected_adapters=[model.active_adapter])
    meta = {"base_model": spec.model, "prompt_format": spec.prompt_format.model_dump(mode="json"),
            "max_length": spec.max_length, **extra}
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest
