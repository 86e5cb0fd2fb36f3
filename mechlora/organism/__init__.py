"""Model organisms: tiny Gemma 3 VLMs, trained here, with a planted commit depth.

An organism's language model has `layers` layers; those below `commit` attend only to a
window of `window` tokens, so the answer position cannot read the question before layer
`commit`. It flips its answers on paraphrase families it never saw. `build_organism()` trains
one (a few minutes on one CPU thread) and caches it as a normal HF model folder with its data
files; `load_folds()` lists the leave-one-family-out folds. See docs/organism.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

from mechlora.errors import MechloraError
from mechlora.organism.splits import Fold, load_folds

VERSION = 2  # bump when the films or the training change: cached builds then no longer match
META = "organism.json"

# The family: depth, planted commit layer, window of the layers below it.
ORGANISMS = {
    "organism-mid": dict(layers=8, commit=4, window=2),
    "organism-early": dict(layers=8, commit=1, window=2),
    "organism-late": dict(layers=8, commit=6, window=2),
    "organism-w3": dict(layers=8, commit=4, window=3),
    "organism-full": dict(layers=8, commit=0, window=2),  # full attention everywhere: control
}
ALIASES = {"organism": "organism-mid"}

__all__ = ["ALIASES", "ORGANISMS", "Fold", "build_organism", "load_folds", "organism_config",
           "organism_dir", "parse_preset", "read_meta"]


def parse_preset(name: str, seed: int | None = None) -> tuple[str, int]:
    """`organism-mid`, `organism-mid@1` or an alias -> (preset name, seed); seed defaults to 0."""
    base, at, tail = str(name).partition("@")
    base = ALIASES.get(base, base)
    if base not in ORGANISMS:
        raise MechloraError(f"unknown organism preset {name!r}; use one of "
                            f"{', '.join([*ORGANISMS, *ALIASES])}, optionally with @SEED")
    if at:
        if not tail.isdigit():
            raise MechloraError(f"organism preset {name!r}: the seed after '@' must be a "
                                "non-negative integer, e.g. organism-mid@1")
        if seed is not None and seed != int(tail):
            raise MechloraError(f"organism preset {name!r} names seed {tail} but seed={seed} "
                                "was also given; give one")
        seed = int(tail)
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MechloraError(f"seed must be a non-negative integer, got {seed!r}")
    return base, seed


def organism_config(preset: str = "organism-mid", seed: int | None = None, *,
                    quick: bool = False):
    """The `OrganismConfig` of a preset and seed (`quick`: the reduced one for tests)."""
    from mechlora.organism.train import QUICK, OrganismConfig

    name, seed = parse_preset(preset, seed)
    return OrganismConfig(seed=seed, **ORGANISMS[name], **(QUICK if quick else {})).validate()


def organism_dir(preset: str = "organism-mid", seed: int | None = None, *,
                 quick: bool = False) -> Path:
    """Default cache folder: `$MECHLORA_HOME` or `~/.cache/mechlora`, one folder per build."""
    name, seed = parse_preset(preset, seed)
    home = os.environ.get("MECHLORA_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "mechlora"
    return base / f"{name}-v{VERSION}-{'quick-' if quick else ''}seed{seed}"


def read_meta(folder: str | Path) -> dict | None:
    """The organism.json of a finished build in `folder`, else None."""
    path = Path(folder) / META
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def code_hash() -> str:
    """Fingerprint of the code that makes an organism (this package and the tokenizer)."""
    from mechlora.models import tokenizer

    files = sorted(Path(__file__).parent.glob("*.py")) + [Path(tokenizer.__file__)]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def build_organism(out_dir: str | Path | None = None, *, preset: str = "organism-mid",
                   seed: int | None = None, rebuild: bool = False, quick: bool = False,
                   progress: bool = True) -> Path:
    """Train an organism into `out_dir` (default `organism_dir(preset, seed)`), or reuse it.

    `preset`: a name of `ORGANISMS` (or `organism`), optionally `@SEED`. `quick=True` trains a
    reduced organism of the same depth and windows in seconds (tests; it is not accurate).
    Returns the folder: model + processor (save_pretrained), organism.json, data/ (see
    `mechlora.organism.splits`; `load_folds(folder)` gives every fold's files).
    """
    from mechlora.organism.questions import bank_hash

    name, seed = parse_preset(preset, seed)
    cfg = organism_config(name, seed, quick=quick)
    out = Path(out_dir).expanduser() if out_dir is not None else organism_dir(name, seed,
                                                                            quick=quick)
    meta = read_meta(out)
    if meta is not None and not rebuild:
        same = (meta.get("version"), meta.get("config"), meta.get("bank"))
        if same == (VERSION, asdict(cfg), bank_hash()):
            return out
        command = (f"python -m mechlora.organism --preset {name}@{seed} --rebuild"
                   + (f" --out {out}" if out_dir is not None else "")
                   + (" --quick" if quick else ""))
        raise MechloraError(f"{out} holds an organism built with other settings or another "
                            f"question bank; replace it with rebuild=True ({command}), or "
                            "choose another folder")
    if out.exists() and meta is None and (not out.is_dir() or any(out.iterdir())):
        raise MechloraError(f"{out} exists and is not an organism folder; refusing to replace "
                            "it: choose another folder or remove it")

    # Build beside the target and rename at the end: an interrupted build leaves no half folder.
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build(tmp, name, cfg, progress=progress)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build(folder: Path, preset: str, cfg, *, progress: bool) -> None:
    import time

    import numpy
    import torch
    import transformers

    from mechlora.io import write_json
    from mechlora.organism.questions import bank_hash
    from mechlora.organism.splits import layout, verify_data, write_data
    from mechlora.organism.train import check_planted, quick_check, train

    t0 = time.perf_counter()
    model, processor, timing = train(cfg, progress=progress)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_data(folder / "data", seed=cfg.seed, n_train=cfg.n_pair_images,
               n_validation=cfg.n_validation_images, n_test=cfg.n_test_images)
    check = quick_check(model, processor, cfg)
    meta = {
        "version": VERSION,
        "preset": preset,
        "config": asdict(cfg),
        "bank": bank_hash(),
        "code": code_hash(),
        # What else decides the weights: training runs on one thread (organism.train.one_thread)
        "torch_threads": 1,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": numpy.__version__, "python": platform.python_version()},
        "planted": {"commit": cfg.commit, "window": cfg.window, "reach": cfg.reach,
                    "suffix_tokens": check_planted(cfg, processor),
                    "layer_types": model.config.text_config.layer_types},
        "parameters": sum(p.numel() for p in model.parameters()),
        **timing,
        "accuracy_train_phrasing": check["accuracy_train_phrasing"],
        "flip_rate_heldout": check["flip_rate_heldout"],
        "check": check,
        "files": layout(),
    }
    write_json(folder / META, meta)
    verify_data(folder)  # refuses a build whose folds leak a test family or image
    meta["build_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(folder / META, meta)
