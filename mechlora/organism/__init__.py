"""The model organism: a tiny Gemma 3 VLM, trained here, that flips on held-out paraphrases.

`build_organism()` trains it once (a few minutes on 2 CPU cores) and caches it as a normal HF
model folder; later calls return the cached folder. See docs/organism.md.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from mechlora.errors import MechloraError

VERSION = 1  # bump when the films or the training change: cached builds then no longer match
META = "organism.json"
DATA = {"train_pairs": "data/train_pairs.jsonl", "heldout": "data/heldout.jsonl"}


def organism_dir(seed: int = 0, *, quick: bool = False) -> Path:
    """Default cache folder: `$MECHLORA_HOME` or `~/.cache/mechlora`, one folder per build."""
    home = os.environ.get("MECHLORA_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "mechlora"
    return base / f"organism-v{VERSION}-{'quick-' if quick else ''}seed{seed}"


def read_meta(folder: str | Path) -> dict | None:
    """The organism.json of a finished build in `folder`, else None."""
    path = Path(folder) / META
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def build_organism(out_dir: str | Path | None = None, *, seed: int = 0, rebuild: bool = False,
                   quick: bool = False, progress: bool = True) -> Path:
    """Train the organism into `out_dir` (default `organism_dir(seed)`), or reuse a cached build.

    `quick=True` trains a reduced organism in seconds (tests; it is not accurate).
    Returns the folder: model + processor (save_pretrained), organism.json, data/*.jsonl.
    """
    from mechlora.organism.questions import bank_hash
    from mechlora.organism.train import QUICK, OrganismConfig

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MechloraError(f"seed must be a non-negative integer, got {seed!r}")
    cfg = OrganismConfig(seed=seed, **(QUICK if quick else {}))
    out = Path(out_dir).expanduser() if out_dir is not None else organism_dir(seed, quick=quick)
    meta = read_meta(out)
    if meta is not None and not rebuild:
        same = (meta.get("version"), meta.get("config"), meta.get("bank"))
        if same == (VERSION, asdict(cfg), bank_hash()):
            return out
        raise MechloraError(f"{out} holds an organism built with other settings or another "
                            "question bank; pass rebuild=True to replace it, or choose another "
                            "folder")
    if out.exists() and meta is None and (not out.is_dir() or any(out.iterdir())):
        raise MechloraError(f"{out} exists and is not an organism folder; refusing to replace "
                            "it: choose another folder or remove it")

    # Build beside the target and rename at the end: an interrupted build leaves no half folder.
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build(tmp, cfg, progress=progress)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build(folder: Path, cfg, *, progress: bool) -> None:
    import torch

    from mechlora.io import write_json
    from mechlora.organism.questions import bank_hash, write_datasets
    from mechlora.organism.train import quick_check, train

    model, processor, timing = train(cfg, progress=progress)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_datasets(folder / "data", seed=cfg.seed, n_train=cfg.n_pair_images,
                   n_test=cfg.n_test_images)
    check = quick_check(model, processor, cfg)
    write_json(folder / META, {
        "version": VERSION,
        "config": asdict(cfg),
        "bank": bank_hash(),
        "parameters": sum(p.numel() for p in model.parameters()),
        **timing,
        "torch_threads": torch.get_num_threads(),
        "accuracy_train_phrasing": check["accuracy_train_phrasing"],
        "flip_rate_heldout": check["flip_rate_heldout"],
        "check": check,
        "files": DATA,
    })
