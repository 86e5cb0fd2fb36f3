"""Per-head sites, multi-site rows and single-position rows: every engine agrees with `full`
(one plain forward per row) where it is exact, and refuses where it is not; TransformerLens
names map to the same sites; the post-norm outputs restore exactly what mechlora's sites do."""

import numpy as np
import pytest
import torch

from mechlora.errors import MechloraError
from mechlora.localize import localize
from mechlora.patching import Prefix, SitePatch
from mechlora.probes import HEADS, Patch, Site, head_sites, patch, record
from mechlora.sites import component, components, parse_site, tl_name
from tests.planted import more_groups
from tests.tiny import decoder, gemma3_text, gemma3_vlm, margins

QUESTION = "does this film show fluid in the pleural space of the left lung?"


def _rows(subject, inputs, k: int, seed: int = 0) -> list:
    """Random values at every head, at single positions, and multi-site rows (a spec)."""
    length = inputs["input_ids"].shape[1]
    pos = torch.arange(length - k, length)
    g = torch.Generator().manual_seed(seed)
    hidden = subject.text_config.hidden_size

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    rows = [SitePatch(s, pos, rand(k, subject.head_dim)) for s in head_sites(subject)]
    rows += [SitePatch(Site(layer, "resid"), pos[j:j + 1], rand(1, hidden))
             for layer in range(subject.n_layers) for j in range(k)]
    rows += [tuple(SitePatch(Site(layer, c), pos, rand(k, hidden))
                   for layer in (1, 2) for c in ("attn", "mlp")),
             (SitePatch(Site(0, HEADS, 1), pos, rand(k, subject.head_dim)),
              SitePatch(Site(2, "mlp"), pos[-1:], rand(1, hidden)))]
    return rows


@pytest.mark.parametrize("kind", ["text", "vlm"])
@pytest.mark.parametrize("fold", [True, False])
def test_heads_positions_and_spec_rows_agree_with_full(kind, fold, monkeypatch):
    """GQA (4 query heads, 2 kv heads), a sliding window of 16 that every 80-token prompt
    crosses, patched suffixes of 1, 5 and 30 tokens; folded and unfolded cached rows."""
    if not fold:
        monkeypatch.setattr(Prefix, "fold_problem", lambda self, subject: "forced")
    subject = (gemma3_text if kind == "text" else gemma3_vlm)(16)
    assert subject.n_heads != subject.text_config.num_key_value_heads
    image = [subject.gray_image()] if subject.is_vlm else None
    inputs = subject.encode([QUESTION], image)
    for k in (1, 5, 30):
        rows = _rows(subject, inputs, k)
        full = margins(subject, inputs, rows, "full")
        unpatched = margins(subject, inputs, [()], "full")  # an empty row patches nothing
        assert (full - unpatched).abs().max() > 0.01  # the patches do something
        for engine in ("batched", "cached"):
            torch.testing.assert_close(margins(subject, inputs, rows, engine), full,
                                       rtol=0, atol=1e-5)


@pytest.mark.parametrize("engine", ["nnsight", "tlens"])
def test_bridges_patch_heads_and_multi_site_rows_like_full(engine):
    subject = gemma3_text(16)
    inputs = subject.encode([QUESTION])
    rows = _rows(subject, inputs, 3)
    torch.testing.assert_close(margins(subject, inputs, rows, engine),
                               margins(subject, inputs, rows, "full"), rtol=0, atol=1e-5)


def test_a_head_site_is_its_slice_of_the_o_proj_input_and_all_heads_are_the_attn_site():
    """Patching every head of a layer with a's z equals patching the attention output with
    o_proj(a's z); a head patch changes only its own `head_dim` columns."""
    subject = gemma3_text(16)
    inputs = subject.encode([QUESTION])
    length = inputs["input_ids"].shape[1]
    pos = torch.arange(length - 2, length)
    z = torch.randn(2, subject.n_heads * subject.head_dim)
    proj = subject.out_proj(1)
    with torch.no_grad():
        heads = [SitePatch(Site(1, HEADS, h), pos, z[:, h * subject.head_dim:
                                                    (h + 1) * subject.head_dim])
                 for h in range(subject.n_heads)]
        attn = SitePatch(Site(1, "attn"), pos, proj(z))
        torch.testing.assert_close(margins(subject, inputs, [tuple(heads)], "full"),
                                   margins(subject, inputs, [attn], "full"), rtol=0, atol=1e-5)
        with patch(subject, [Patch(0, heads[2].site, pos, heads[2].values)]), \
                record(subject, [Site(1, HEADS)], pos[None]) as seen:
            subject.model(**inputs)
        d = subject.head_dim
        torch.testing.assert_close(seen[Site(1, HEADS)][0, :, 2 * d:3 * d], heads[2].values)
    with record(subject, [Site(1, HEADS)], pos[None]) as clean, torch.no_grad():
        subject.model(**inputs)
    changed = (seen[Site(1, HEADS)] != clean[Site(1, HEADS)])[0].any(0)
    assert changed.nonzero().flatten().tolist() == list(range(2 * d, 3 * d))


def test_gpt2_heads_are_found_and_a_model_without_heads_per_column_is_refused():
    subject = decoder("gpt2")
    assert len(head_sites(subject)) == 3 * 4
    inputs = subject.encode([QUESTION])
    rows = [SitePatch(s, torch.tensor([inputs["input_ids"].shape[1] - 1]),
                      torch.randn(1, subject.head_dim)) for s in head_sites(subject)]
    torch.testing.assert_close(margins(subject, inputs, rows, "batched"),
                               margins(subject, inputs, rows, "full"), rtol=0, atol=1e-5)
    subject.text_config.n_head = 5  # 32 features are not 5 heads x 6
    with pytest.raises(MechloraError, match="per-head sites need one slice per query head"):
        head_sites(subject)


def test_localize_heads_and_positions_engines_agree():
    subject = gemma3_text(16, seed=3)
    kw = dict(heads=True, per_position=True, positions="suffix:4", components=["resid"],
              min_delta=0.05, progress=False, logit_lens=False)
    groups = more_groups()[:2]
    full = localize(subject, groups, engine="full", **kw)
    cached = localize(subject, groups, engine="cached", **kw)
    assert full.n_pairs == 4 and cached.engine == "cached"
    assert cached.heads.shape == (4, subject.n_layers, subject.n_heads)
    assert cached.by_position["resid"].shape == (4, subject.n_layers, 4)
    np.testing.assert_allclose(cached.heads, full.heads, atol=1e-4)
    np.testing.assert_allclose(cached.by_position["resid"], full.by_position["resid"],
                               atol=1e-4)
    # the last position alone is the whole `last` sweep
    last = localize(subject, groups, engine="cached", components=["resid"], min_delta=0.05,
                    progress=False, logit_lens=False)
    np.testing.assert_allclose(cached.by_position["resid"][:, :, -1], last.restoration["resid"],
                               atol=1e-5)


def test_single_position_rows_continue_the_prefix_cut_at_their_own_position(monkeypatch):
    """Rows patching only position p recompute from p on (one call per position, each over
    the clean run's cache cut there), not the whole suffix."""
    from mechlora import patching

    subject = gemma3_text(512, seed=3)  # no layer drops keys: cuts at every position
    starts, original = [], patching.run_cached

    def spy(subject, inputs, patches, *args, prefix=None, **kw):
        starts.append((patching.patch_start(patches), prefix is not None and prefix.start))
        return original(subject, inputs, patches, *args, prefix=prefix, **kw)

    monkeypatch.setitem(patching.RUNNERS, "cached", spy)
    localize(subject, more_groups()[:1], per_position=True, positions="suffix:3",
             components=["resid"], min_delta=1e-3, progress=False, logit_lens=False)
    length = {len(subject.encode([v.text])["input_ids"][0]) for v in more_groups()[0].variants}
    assert len(starts) == 2 * 3  # two recipients, three starts each
    assert all(start == cut for start, cut in starts)
    assert {length_ - start for length_ in length for start, _ in starts} >= {1, 2, 3}


def test_per_position_and_heads_are_refused_where_they_cannot_be_exact(tiny_text):
    groups = more_groups()[:1]
    with pytest.raises(MechloraError, match="per_position .* 'last' has one"):
        localize(tiny_text, groups, per_position=True, progress=False)
    with pytest.raises(MechloraError, match="engine attribution estimates per-layer sites "
                                            "only; heads"):
        localize(tiny_text, groups, heads=True, engine="attribution", progress=False)
    bidirectional = gemma3_text(16, use_bidirectional_attention=True)
    with pytest.raises(MechloraError, match="use_bidirectional_attention"):
        localize(bidirectional, groups, heads=True, engine="cached", min_delta=1e-3,
                 progress=False)


def test_transformerlens_names_are_aliases_of_the_same_sites(tiny_text):
    assert component("blocks.{l}.hook_resid_post") == "resid"
    assert component("hook_attn_out") == "attn" and component("blocks.*.hook_mlp_out") == "mlp"
    assert components("blocks.{l}.hook_resid_post,attn.hook_z") == (["resid"], True)
    assert parse_site("blocks.3.hook_attn_out") == Site(3, "attn")
    assert parse_site("blocks.3.attn.hook_z[1]") == parse_site("z@3.1") == Site(3, HEADS, 1)
    assert tl_name(Site(3, HEADS, 1)) == "blocks.3.attn.hook_z[1]"
    for bad in ("blocks.3.hook_q", "resid@x", "blocks.3.hook_mlp_out[1]"):
        with pytest.raises(MechloraError):
            parse_site(bad)
    groups = more_groups()[:2]
    kw = dict(min_delta=1e-3, progress=False, logit_lens=False)
    ours = localize(tiny_text, groups, components=["resid", "attn", "mlp"], **kw)
    theirs = localize(tiny_text, groups, components=["blocks.{l}.hook_resid_post",
                                                     "hook_attn_out", "blocks.*.hook_mlp_out"],
                      **kw)
    assert theirs.components == ("resid", "attn", "mlp")
    for c in ours.components:
        np.testing.assert_array_equal(theirs.restoration[c], ours.restoration[c])


@pytest.mark.parametrize("which", ["attn", "mlp"])
def test_patching_after_the_post_norm_restores_exactly_what_mechlora_sites_do(which):
    """TransformerLens's hook_attn_out / hook_mlp_out of Gemma 3 are the post-norm outputs;
    mechlora's sites are before the norm. Writing a's value at either point gives the same
    patched margin (the norm acts on each position alone)."""
    subject = gemma3_text(16, seed=4)
    a, b = (subject.encode([q]) for q in ("is there fluid?", QUESTION))
    la, lb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    layer = 1
    block = subject.layers[layer]
    norm = block.post_attention_layernorm if which == "attn" else block.post_feedforward_layernorm
    grabbed = {}
    handle = norm.register_forward_hook(lambda m, i, o: grabbed.update(post=o[0, -1].clone()))
    with torch.no_grad(), record(subject, [Site(layer, which)], torch.tensor([[la - 1]])) as pre:
        subject.model(**a)
    handle.remove()
    post = grabbed["post"]

    def write_post(module, args, output):
        output = output.clone()
        output[0, -1] = post
        return output

    ours = margins(subject, b, [SitePatch(Site(layer, which), torch.tensor([lb - 1]),
                                          pre[Site(layer, which)][0])], "full")
    handle = norm.register_forward_hook(write_post)
    try:
        theirs = margins(subject, b, [()], "full")  # only the hook at the norm's output
    finally:
        handle.remove()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert (theirs - margins(subject, b, [()], "full")).abs().max() > 0.01
