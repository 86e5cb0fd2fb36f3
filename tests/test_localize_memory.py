"""Patched rows are split by an estimate of bytes; the split never changes a result."""

import numpy as np
import pytest
import torch

from mechlora import memory
from mechlora.data import EXAMPLE_PATH, load_groups, make_pairs
from mechlora.errors import MechloraError
from mechlora.localize import localize
from mechlora.patching import Prefix


@pytest.fixture(scope="module")
def pairs():
    return make_pairs(load_groups(EXAMPLE_PATH)[:2], max_pairs_per_group=2)


@pytest.fixture
def sizes(monkeypatch):
    """The rows per forward each engine call chose."""
    chosen, original = [], memory.rows_per_forward

    def spy(*args, **kw):
        chosen.append(original(*args, **kw))
        return chosen[-1]

    monkeypatch.setattr(memory, "rows_per_forward", spy)
    return chosen


@pytest.mark.parametrize("engine", ["cached", "cached-unfolded", "batched"])
def test_results_do_not_depend_on_the_split(tiny_vlm, pairs, engine, sizes, monkeypatch):
    if engine == "cached-unfolded":
        monkeypatch.setattr(Prefix, "fold_problem", lambda self, subject: "forced")
    kw = dict(engine=engine.split("-")[0], positions="suffix:3", min_delta=1e-3,
              progress=False)
    whole = localize(tiny_vlm, pairs, **kw)
    assert min(sizes) == 3 * tiny_vlm.n_layers  # one forward per recipient and donor
    sizes.clear()
    # A budget of a few rows' bytes, then an odd row cap: many uneven chunks.
    one_row = {"cached": memory.folded_rows, "cached-unfolded": memory.unfolded_rows}
    length = tiny_vlm.encode([pairs[0].text_b], [tiny_vlm.gray_image()])["input_ids"].shape[1]
    cost = memory.TokenCost.of(tiny_vlm)
    if engine == "batched":
        budget = memory.prompt_rows(cost, 3, length)
    else:
        budget = one_row[engine](cost, 3, length - 3, 3)
    split = localize(tiny_vlm, pairs, max_bytes=budget, **kw)
    assert max(sizes) < 3 * tiny_vlm.n_layers and min(sizes) >= 1
    sizes.clear()
    capped = localize(tiny_vlm, pairs, max_rows=7, **kw)
    assert set(sizes) == {7}
    # Equal up to fp32 rounding: a folded forward of other length multiplies matrices of
    # other shapes (measured: 1.3e-6 in r at most).
    for other in (split, capped):
        assert other.pair_ids == whole.pair_ids
        for c in whole.components:
            np.testing.assert_allclose(other.restoration[c], whole.restoration[c],
                                       rtol=0, atol=1e-5)


def test_rows_per_forward_is_the_largest_split_that_fits():
    def cost(rows):
        return 100 * rows + rows ** 2  # grows with rows, like the folded estimate

    assert memory.rows_per_forward(cost, 50, max_bytes=cost(50)) == 50
    assert memory.rows_per_forward(cost, 50, max_bytes=cost(17)) == 17
    assert memory.rows_per_forward(cost, 50, max_bytes=cost(17) + 1) == 17
    assert memory.rows_per_forward(cost, 50, max_bytes=1) == 1  # never fewer than one row
    assert memory.rows_per_forward(cost, 50, max_bytes=10**9, max_rows=8) == 8
    assert list(memory.chunks(7, 3)) == [(0, 3), (3, 6), (6, 7)]


def test_medgemma_figures_quoted_in_the_docs():
    """docs/memory.md: a 310-token MedGemma-4B prompt holds 43 MB of keys and values; under
    the default 4 GiB budget one forward takes 99 unfolded or 6507 folded single-token rows
    (the old fixed cap of 1024 unfolded rows was about 44 GB)."""
    from mechlora.models.presets import medgemma_4b_config

    cfg = medgemma_4b_config().text_config
    cost = memory.TokenCost.from_config(cfg, cfg.num_hidden_layers, torch.bfloat16)
    assert cost.kv == 34 * 2 * 4 * 256 * 2
    assert round(310 * cost.kv / 1e6, 1) == 43.2
    assert round(memory.unfolded_rows(cost, 1024, 309, 1) / 1e9) == 44
    lines = memory.table(cost)
    assert "99 rows per forward" in lines[2] and "6507 rows per forward" in lines[3]
    assert "103 rows per forward" in lines[1] and "813 rows per forward" in lines[5]


@pytest.mark.parametrize("bad", [dict(max_rows=0), dict(max_bytes=0), dict(max_bytes=-5)])
def test_bad_limits_are_refused(tiny_text, pairs, bad):
    with pytest.raises(MechloraError, match="max_"):
        localize(tiny_text, pairs[:1], progress=False, **bad)
