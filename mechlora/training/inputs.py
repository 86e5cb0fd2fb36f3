"""What a run reads: the training and held-out question groups, and every path behind them."""

from __future__ import annotations

from pathlib import Path

from mechlora.data import QuestionGroup, data_hash, load_groups
from mechlora.errors import DataError, MechloraError


def read_groups(pairs, what: str) -> list[QuestionGroup]:
    """A data file or a list of QuestionGroups, checked: every group has two wordings or more."""
    groups = load_groups(pairs) if isinstance(pairs, (str, Path)) else list(pairs)
    if not groups:
        raise DataError(f"no {what} question groups given")
    for g in groups:
        if not isinstance(g, QuestionGroup):
            raise MechloraError(f"{what} data must be a data file or QuestionGroups, "
                                f"got {type(g).__name__}")
        if len(g.variants) < 2:
            raise DataError(f"group {g.id!r} has one wording; a pair needs two",
                            file=g.source, line=g.line)
    return groups


def data_info(source, groups: list[QuestionGroup] | None) -> dict | None:
    """The `data.train` / `data.eval` entry of mechlora.json."""
    if groups is None:
        return None
    path = str(source) if isinstance(source, (str, Path)) else None
    return {"path": path, "sha256": data_hash(groups), "n_groups": len(groups)}


def read_paths(model, sources: list, groups: list[QuestionGroup], from_localization
               ) -> list[Path | str | None]:
    """Every file and folder the run reads: an output folder may contain none of them."""
    folders = {g.image.parent for g in groups if g.image is not None}
    files = [s for s in sources if isinstance(s, (str, Path))]
    return [model if isinstance(model, str) else None, *files, *folders, from_localization]
