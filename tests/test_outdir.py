"""`--overwrite` never loses data: an output folder is never an input, the working directory or
home, and only a folder mechlora made (it holds the marker) is ever deleted."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from mechlora.data import EXAMPLE_PATH
from mechlora.errors import MechloraError
from mechlora.io import MARKER, check_out_dir, prepare_out_dir
from tests.cli import run_cli


@pytest.fixture
def data(tmp_path) -> Path:
    """A copy of the bundled example: data/pairs.jsonl and data/images/*.png."""
    folder = tmp_path / "data"
    shutil.copytree(EXAMPLE_PATH.parent, folder)
    return folder / EXAMPLE_PATH.name


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def cli(args: list[str], capsys) -> tuple[int, str]:
    code, _, err = run_cli(args, capsys)
    return code, err


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> dict[str, str]:
    """Inputs outside the data folder: an SAE file and a held-out copy of the example."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("inputs")
    shutil.copytree(EXAMPLE_PATH.parent, folder / "heldout")
    save_file({"W_enc": torch.zeros(64, 8), "W_dec": torch.zeros(8, 64), "b_enc": torch.zeros(8),
               "b_dec": torch.zeros(64)}, folder / "sae.safetensors")
    return {"{sae}": str(folder / "sae.safetensors"),
            "{eval}": str(folder / "heldout" / EXAMPLE_PATH.name)}


@pytest.mark.parametrize("command", [
    ["train", "--model", "tiny-gemma3-vlm", "--layers", "2-3", "--max-steps", "1"],
    ["localize", "--model", "tiny-gemma3-text"],
    ["eval", "--model", "tiny-gemma3-vlm", "--no-progress"],
    ["sae", "rank", "--model", "tiny-gemma3-text", "--sae", "{sae}", "--layer", "5", "-q"],
    ["compare", "--model", "tiny-gemma3-vlm", "--eval", "{eval}", "--arms", "early:1",
     "--seeds", "1", "--max-steps", "1", "-q"],
])
@pytest.mark.parametrize("where", ["data folder", "its parent", "image folder"])
def test_overwrite_never_deletes_the_inputs(command, where, data, elsewhere, capsys) -> None:
    out = {"data folder": data.parent, "its parent": data.parent.parent,
           "image folder": data.parent / "images"}[where]
    before = listing(data.parent)
    command = [elsewhere.get(word, word) for word in command]
    code, err = cli([*command, "--pairs", str(data), "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and "which this run reads" in err and "Traceback" not in err
    assert listing(data.parent) == before  # today's main deleted the folder first


@pytest.mark.parametrize("command", [
    ["compare", "--model", "tiny-gemma3-text", "--eval", "{eval}", "--arms", "early:1",
     "--seeds", "1", "--max-steps", "1", "-q"],
    ["sae", "rank", "--model", "tiny-gemma3-text", "--sae", "{sae}", "--layer", "5", "-q"],
])
@pytest.mark.parametrize("where", ["data folder", "its parent"])
def test_overwrite_never_deletes_text_only_data(command, where, tmp_path, elsewhere,
                                                capsys) -> None:
    """Without images the data file itself must be what protects its folder."""
    from mechlora.data import load_groups, write_groups

    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    write_groups(data, [dataclasses.replace(g, image=None) for g in load_groups(EXAMPLE_PATH)])
    (data.parent / "notes.txt").write_text("mine")
    out = data.parent if where == "data folder" else tmp_path
    command = [elsewhere.get(word, word) for word in command]
    code, err = cli([*command, "--pairs", str(data), "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and f"{data}, which this run reads" in err
    assert "Traceback" not in err and listing(data.parent) == ["notes.txt", "train.jsonl"]


def test_working_directory_home_and_root_are_never_outputs(tmp_path, monkeypatch) -> None:
    for sub in ("home", "work"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "file").write_text("kept")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "work")
    for out, what in ((".", "is the working directory"), (tmp_path / "home", "is your home"),
                      (tmp_path, "contains the working directory"), ("/", "contains")):
        with pytest.raises(MechloraError, match=what):
            prepare_out_dir(out, overwrite=True)
    assert all((tmp_path / sub / "file").is_file() for sub in ("home", "work"))


def test_a_folder_mechlora_did_not_make_is_never_replaced(tmp_path, capsys) -> None:
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(MechloraError, match=f"not made by mechlora.*{MARKER}"):
            prepare_out_dir(mine, overwrite=overwrite)
    code, err = cli(["localize", "--model", "tiny-gemma3-text", "--out", str(mine),
                     "--overwrite"], capsys)
    assert code == 2 and "never replaced" in err
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_folder_mechlora_made_is_replaced_with_overwrite(tmp_path) -> None:
    out = prepare_out_dir(tmp_path / "run")
    (out / "old-result.json").write_text("{}")
    with pytest.raises(MechloraError, match="already holds results; pass --overwrite"):
        prepare_out_dir(out)
    prepare_out_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER]  # emptied, still marked
    (out / "new.json").write_text("{}")
    check_out_dir(out, resume=True)  # a resumed run keeps what is there
    prepare_out_dir(out, resume=True)
    assert (out / "new.json").is_file()


def test_an_empty_or_new_folder_is_marked(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        prepare_out_dir(folder)
        assert (folder / MARKER).is_file()
        prepare_out_dir(folder)  # only the marker inside: still counts as empty


def test_train_refuses_to_resume_into_a_foreign_folder(tmp_path, data) -> None:
    from mechlora.train import TrainConfig, train

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(MechloraError, match="not made by mechlora, so choose another --out"):
        train("tiny-gemma3-vlm", data, layers="2-3", out=foreign, resume=True, progress=False,
              device="cpu", config=TrainConfig(max_steps=1))
    assert (foreign / "keep.txt").read_text() == "mine"
