"""`accelerate launch -m mechlora localize` on 2 CPU processes (gloo) gives the same result as
one process."""

import os
import subprocess
import sys

import numpy as np

from mechlora.data import EXAMPLE_PATH, load_groups, make_pairs, write_groups
from mechlora.localize import localize
from mechlora.models import load_model
from mechlora.result import LocalizationResult, merge_results


def test_merge_restores_the_original_pair_order(tiny_text):
    groups = [g.__class__(**{**g.__dict__, "image": None}) for g in load_groups(EXAMPLE_PATH)[:3]]
    pairs = make_pairs(groups, max_pairs_per_group=2)
    whole = localize(tiny_text, pairs, min_delta=1e-6, progress=False)
    parts = [localize(tiny_text, pairs[i::2], min_delta=1e-6, progress=False) for i in range(2)]
    merged = merge_results(parts, [p.id for p in pairs])
    assert merged.pair_ids == whole.pair_ids
    for c in whole.components:
        np.testing.assert_allclose(merged.restoration[c], whole.restoration[c], atol=1e-6)


def test_two_processes_equal_one(tmp_path):
    data = tmp_path / "data" / "pairs.jsonl"
    data.parent.mkdir()
    groups = [g.__class__(**{**g.__dict__, "image": None}) for g in load_groups(EXAMPLE_PATH)[:3]]
    write_groups(data, groups)
    # `accelerate launch --cpu` needs MPI for several processes; torchrun starts the same
    # gloo process group that `accelerate launch` does on GPUs.
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [launcher, "--standalone", "--nproc-per-node", "2", "-m", "mechlora", "localize",
           "--model", "tiny-gemma3-text", "--pairs", str(data), "--out", str(tmp_path / "two"),
           "--max-pairs-per-group", "2", "--min-delta", "1e-6", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = LocalizationResult.load(tmp_path / "two")
    assert two.settings["processes"] == 2
    one = localize(load_model("tiny-gemma3-text"), make_pairs(groups, max_pairs_per_group=2),
                   min_delta=1e-6, progress=False)
    assert two.pair_ids == one.pair_ids
    for c in one.components:
        np.testing.assert_allclose(two.restoration[c], one.restoration[c], atol=1e-5)
