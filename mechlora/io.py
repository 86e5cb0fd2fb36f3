"""Safe output: atomic writes, no silent overwrites, safetensors for arrays."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mechlora.errors import MechloraError

MARKER = ".mechlora-output"  # in every folder mechlora creates as an output: safe to replace


def prepare_out_dir(path: str | os.PathLike, overwrite: bool = False, *, resume: bool = False,
                    inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Create an output folder (marked as mechlora's); replace it only if mechlora made it.

    `inputs`: every path the command reads (data, images, model folder, ...); the folder may
    neither be nor contain any of them, so `--overwrite` can never delete what a run reads.
    """
    out = check_out_dir(path, overwrite, resume=resume, inputs=inputs)
    if overwrite and not resume and _has_content(out):
        shutil.rmtree(out)  # check_out_dir found the marker: mechlora made this folder
    if not _has_content(out):  # new or empty: mechlora's from now on (never a resumed foreign one)
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).touch()
    return out


def check_out_dir(path: str | os.PathLike, overwrite: bool = False, *, resume: bool = False,
                  inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Raise if `path` cannot be used as an output folder; changes nothing."""
    out = Path(path)
    where = out.expanduser().resolve()
    for name, place in (("the working directory", Path.cwd()), ("your home folder", Path.home()),
                        ("the file system root", Path(where.anchor))):
        if place.resolve().is_relative_to(where):
            what = "is" if place.resolve() == where else "contains"
            raise MechloraError(f"--out {out} {what} {name}; choose a folder of its own, "
                                "e.g. runs/NAME")
    for item in inputs:
        if item is not None and _inside(Path(item), where):
            raise MechloraError(f"--out {out} is or contains {item}, which this run reads; "
                                "choose another output folder")
    if out.exists() and not out.is_dir():
        raise MechloraError(f"{out} exists and is not a folder; choose another --out")
    if _has_content(out) and not resume:
        if not is_mechlora_output(out):
            raise MechloraError(f"{out} is not empty and was not made by mechlora (it has no "
                                f"{MARKER} marker), so it is never replaced, --overwrite or "
                                "not; choose another --out (or empty it yourself)")
        if not overwrite:
            raise MechloraError(f"{out} already holds results; pass --overwrite to replace "
                                "them or choose another --out")
    return out


def is_mechlora_output(folder: str | os.PathLike) -> bool:
    """Whether mechlora created `folder` as an output (it holds the marker file)."""
    return (Path(folder) / MARKER).is_file()


def _has_content(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != MARKER for p in folder.iterdir())


def _inside(item: Path, folder: Path) -> bool:
    """`item` (an existing path) is `folder` or lies inside it; links resolved."""
    item = item.expanduser()
    return item.exists() and item.resolve().is_relative_to(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600 files; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(obj: Any) -> Any:
    """Strict JSON: dict keys to str, tuples and arrays to lists, numpy scalars to Python, and
    NaN/inf (undefined numbers) to null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MechloraError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise MechloraError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSON Lines text: split on "\n" only, as the format says.

    `str.splitlines()` also splits on U+2028, U+2029, U+0085, \v, \f and \x1c-\x1e, which a
    JSON string may hold unescaped (a question pasted from a PDF), so it would cut a record in
    two. A "\r" before the "\n" stays on the line; JSON reads it as whitespace.
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last record
    return lines


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Every record of a JSON Lines file (blank lines skipped), or an error naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MechloraError(f"{path} not found") from None
    records = []
    for number, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise MechloraError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be "
                                "one complete JSON value") from None
    return records


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Arrays to safetensors (never pickle), written atomically."""
    from safetensors.numpy import save

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))
