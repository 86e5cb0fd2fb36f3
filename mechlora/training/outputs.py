"""The finished adapter folder, written so that a crash never leaves half an adapter.

Everything is first written into OUT/.final.tmp/, then moved into OUT one file at a time
(`os.replace`, atomic): the processor files, the weights, then adapter_config.json (without
which PEFT sees no adapter), the model card, and mechlora.json last, the mark of a finished run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mechlora.card import model_card
from mechlora.io import read_json, write_json
from mechlora.training.step import Run

LAST = ("adapter_model.safetensors", "adapter_config.json", "README.md", "mechlora.json")


def write_outputs(run: Run, record: dict, out: Path) -> None:
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    run.subject.model.save_pretrained(str(tmp), save_embedding_layers=False)
    processor = run.subject.processor
    if hasattr(processor, "save_pretrained"):
        processor.save_pretrained(str(tmp))
    (tmp / "README.md").write_text(model_card(record), encoding="utf-8")  # replaces PEFT's stub
    write_json(tmp / "mechlora.json", record)
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n not in LAST] + [n for n in LAST if n in names]:
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp)


def finished(out: Path) -> dict | None:
    """The mechlora.json record of a finished run in `out`, else None."""
    path = out / "mechlora.json"
    if not path.is_file() or not (out / "adapter_config.json").is_file():
        return None
    return read_json(path)
