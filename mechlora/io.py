"""Safe output: atomic writes, no silent overwrites, safetensors for arrays."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mechlora.errors import MechloraError


def prepare_out_dir(path: str | os.PathLike, overwrite: bool = False, *,
                    resume: bool = False) -> Path:
    """Create an output folder; refuse to reuse a non-empty one unless told to."""
    out = check_out_dir(path, overwrite, resume=resume)
    if out.exists() and overwrite and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_out_dir(path: str | os.PathLike, overwrite: bool = False, *,
                  resume: bool = False) -> Path:
    """Raise if `path` cannot be used as an output folder; changes nothing."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MechloraError(f"{out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise MechloraError(f"{out} already holds results; pass --overwrite to replace them "
                            "or choose another --out")
    return out


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
