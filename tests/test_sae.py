"""SAE features: an SAE planted on the planted model (its feature F_STAR is the gate) is
ranked, patched and clamped as predicted; every file layout loads; bad files are refused."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mechlora.errors import MechloraError
from mechlora.localize import localize
from mechlora.probes import Site, record
from mechlora.sae import (
    SAE,
    FeaturePatchResult,
    FeatureRanking,
    attach_layer,
    clamp_eval,
    clamp_feature,
    load_sae,
    patch_features,
    patched_resid,
    rank_features,
    resolve_value,
)
from tests.cli import run_cli
from tests.planted import planted_groups, planted_subject
from tests.sae_planted import F_STAR, last_resid, planted_sae

K = 2  # the planted layer


@pytest.fixture(scope="module")
def planted():
    subject = planted_subject(K)
    return subject, planted_sae(subject, K)


# ---- the planted SAE ----------------------------------------------------------------------

def test_planted_feature_is_ranked_first(planted):
    subject, sae = planted
    for score in ("abs", "signed"):
        ranking = rank_features(subject, sae, planted_groups(), score=score, progress=False)
        assert ranking.n_pairs == 3  # one unordered pair per question, all of them flips
        assert int(ranking.top[0]) == F_STAR
        # F_STAR is ~16.6 on phrasing A, 0 on B; no other feature differs by more than ~1.
        assert ranking.mean[F_STAR] > 10 * np.abs(np.delete(ranking.mean, F_STAR)).max()
    # signed: higher in the wording with the larger margin (phrasing A answers yes)
    assert ranking.mean[F_STAR] > 0
    x = last_resid(subject, K)
    direct = (sae.encode(torch.stack(x["a"])) - sae.encode(torch.stack(x["b"])))[:, F_STAR]
    np.testing.assert_allclose(ranking.per_pair[:, 0], direct.numpy(), rtol=1e-5)
    xs = torch.cat([torch.stack(x["a"]), torch.stack(x["b"])])
    rel = sae.error(xs).norm(dim=-1) / xs.norm(dim=-1)
    assert ranking.fit["relative_error"] == pytest.approx(float(rel.mean()), rel=1e-4)
    assert ranking.fit["n_positions"] == 6
    assert ranking.fit["l0"] == pytest.approx(float((sae.encode(xs) != 0).sum(-1).double().mean()))


def test_rank_refuses_positions_that_reach_into_the_question(planted):
    """suffix:K past the tokens both wordings share would rank features of different words;
    refused as sae patch and localize refuse, naming the first differing token (computed here
    from the tokenized prompts)."""
    subject, sae = planted
    g = planted_groups()[0]
    ids = [subject.encode([v.text])["input_ids"][0].tolist() for v in g.variants]
    shared = next(i for i in range(1, min(map(len, ids))) if ids[0][-i] != ids[1][-i]) - 1
    words = [subject.tokenizer.decode([t[-shared - 1]]) for t in ids]
    for only_flips in (True, False):
        with pytest.raises(MechloraError, match="reach into the question") as e:
            rank_features(subject, sae, planted_groups(), positions=f"suffix:{shared + 1}",
                          only_flips=only_flips, progress=False)
        assert f"token {shared + 1} from the end is {words[0]!r}" in str(e.value)
        assert f"but {words[1]!r}" in str(e.value)
        assert f"share their last {shared} tokens" in str(e.value)
    assert rank_features(subject, sae, planted_groups(), positions=f"suffix:{shared}",
                         progress=False).n_pairs == 3


def test_patching_the_planted_feature_restores_and_a_random_one_does_not(planted):
    subject, sae = planted
    result = patch_features(subject, sae, planted_groups(), [F_STAR], progress=False)
    assert result.rows == [f"f{F_STAR}", "random1", "random2", "random3", "random4", "random5",
                           "all_features", "resid"]
    assert result.n_pairs == 6 and not result.excluded
    assert np.all(np.abs(result.row(f"f{F_STAR}") - 1) < 0.15)  # per pair, both directions
    for i in range(5):
        assert np.all(np.abs(result.row(f"random{i + 1}")) < 0.1)
    drawn = result.random_features
    assert drawn.shape == (6, 5, 1) and (drawn >= 0).all() and (drawn != F_STAR).all()
    # the resid row is localize's resid restoration at this layer, computed independently
    loc = localize(subject, planted_groups(), components=["resid"], progress=False)
    assert loc.pair_ids == result.pair_ids
    np.testing.assert_allclose(result.row("resid"), loc.restoration["resid"][:, K], atol=1e-5)
    assert abs(result.summary()["error_share"]["mean"]) < 0.1  # the SAE reconstructs the gate


@pytest.mark.parametrize("positions", ["last", "suffix:3"])
def test_feature_patches_run_on_every_exact_engine_alike(planted, positions):
    subject, sae = planted
    runs = {e: patch_features(subject, sae, planted_groups(), [F_STAR, 3], engine=e,
                              n_random=2, positions=positions, progress=False)
            for e in ("cached", "batched", "full")}
    for engine, result in runs.items():
        assert result.engine == engine
        np.testing.assert_allclose(result.restoration, runs["full"].restoration, atol=1e-4)
        np.testing.assert_array_equal(result.random_features, runs["full"].random_features)
    assert np.all(np.abs(runs["full"].row(f"f{F_STAR}") - 1) < 0.15)


def test_bf16_model_with_a_float32_sae():
    subject = planted_subject(K)
    sae = planted_sae(subject, K)  # fitted on the float32 model
    subject.model.to(torch.bfloat16)
    for engine in ("cached", "full"):
        result = patch_features(subject, sae, planted_groups(), [], n_random=0, engine=engine,
                                progress=False)
        assert np.all(result.row("set") == 0)  # x_b written back in bf16 is x_b itself
    result = patch_features(subject, sae, planted_groups(), [F_STAR], n_random=0,
                            progress=False)
    assert np.all(np.abs(result.row(f"f{F_STAR}") - 1) < 0.15)


def test_the_error_term_is_kept(planted):
    subject, sae = planted
    x = torch.stack(last_resid(subject, K)["b"])
    z = sae.encode(x)
    torch.testing.assert_close(sae.decode(z) + sae.error(x), x, rtol=0, atol=1e-6)
    assert sae.error(x).norm(dim=-1).max() > 0.1  # a real, non-zero error term
    xa = torch.stack(last_resid(subject, K)["a"])
    assert torch.equal(patched_resid(sae, x, sae.encode(xa), z, torch.tensor([], dtype=int)), x)
    # all features plus the difference of the error terms is the donor's residual
    every = patched_resid(sae, x, sae.encode(xa), z, None)
    torch.testing.assert_close(every + sae.error(xa) - sae.error(x), xa, rtol=0, atol=1e-5)
    # patching no feature leaves every recipient's margin as it was
    for engine in ("cached", "full"):
        none = patch_features(subject, sae, planted_groups(), [], n_random=0, engine=engine,
                              progress=False)
        assert none.rows == ["set", "all_features", "resid"]
        assert np.abs(none.row("set")).max() < 1e-6


def test_clamping_the_gate_sets_every_answer(planted):
    subject, sae = planted
    a_mean = float(sae.encode(torch.stack(last_resid(subject, K)["a"]))[:, F_STAR].mean())
    yes = clamp_eval(subject, sae, F_STAR, "mean:0", planted_groups(), progress=False)
    assert yes.value == pytest.approx(a_mean, rel=1e-5)
    head = yes.headline()
    assert head["accuracy"]["base"] == 0.5 and head["pairwise_flip_rate"]["base"] == 1.0
    # phrasing A's value of the gate feature: every wording answers as A does ("yes")
    assert head["accuracy"]["clamped"] == 1.0 and head["pairwise_flip_rate"]["clamped"] == 0.0
    no = clamp_eval(subject, sae, F_STAR, 0.0, planted_groups(), progress=False).headline()
    assert no["accuracy"]["clamped"] == 0.0 and no["pairwise_flip_rate"]["clamped"] == 0.0
    # a random feature clamped to its value on phrasing A changes nothing
    other = clamp_eval(subject, sae, 3, "mean:0", planted_groups(), progress=False).headline()
    assert other["accuracy"]["clamped"] == 0.5 and other["pairwise_flip_rate"]["clamped"] == 1.0
    assert not subject.layers[K]._forward_hooks  # the clamp is gone afterwards


@pytest.mark.parametrize("positions", ["last", "all"])
def test_the_clamp_moves_only_along_the_feature(planted, positions):
    subject, sae = planted
    site = Site(K, "resid")
    inputs = subject.encode([planted_groups()[0].variants[1].text])
    every = torch.arange(inputs["input_ids"].shape[1])[None]
    with torch.no_grad():
        with record(subject, [site], every) as clean:
            before = subject.model(**inputs).logits
        with clamp_feature(subject, sae, F_STAR, 9.0, positions=positions), \
                record(subject, [site], every) as held:
            subject.model(**inputs)
        after = subject.model(**inputs).logits
    assert torch.equal(before, after)  # the model is left as it was
    moved = held[site][0] - clean[site][0]
    # x' = x + (v - z_f(x)) W_dec[f]: the reconstruction with z_f = v, error term kept
    expect = (9.0 - sae.encode(clean[site][0], F_STAR))[:, None] * sae.W_dec[F_STAR]
    if positions == "last":
        expect[:-1] = 0
    torch.testing.assert_close(moved, expect, rtol=0, atol=1e-5)
    if positions == "last":
        assert torch.equal(moved[:-1], torch.zeros_like(moved[:-1]))


def test_clamp_values():
    rows = [{"group": "q", "variant": v, "phenomenon": p, "mean": m, "max": m + 1}
            for v, p, m in ((0, None, 2.0), (1, "lexical", 4.0), (2, "lexical", 6.0))]
    assert resolve_value("0.5") == (0.5, 0)
    assert resolve_value("mean", rows) == (4.0, 3)
    assert resolve_value("mean:0", rows) == (2.0, 1)
    assert resolve_value("mean:original", rows) == (2.0, 1)
    assert resolve_value("mean:lexical", rows) == (5.0, 2)
    assert resolve_value("max*2", rows) == (14.0, 3)
    with pytest.raises(MechloraError, match="phenomena lexical"):
        resolve_value("mean:negation", rows)
    with pytest.raises(MechloraError, match="not a clamp value"):
        resolve_value("twice", rows)


def test_results_round_trip(planted, tmp_path):
    subject, sae = planted
    ranking = rank_features(subject, sae, planted_groups(), top=4, progress=False)
    ranking.save(tmp_path / "rank")
    back = FeatureRanking.load(tmp_path / "rank")
    assert back.features(4) == ranking.features(4)
    np.testing.assert_array_equal(back.per_pair, ranking.per_pair)
    doc = json.loads((tmp_path / "rank" / "sae.json").read_text())
    assert doc["schema_version"] == 1 and doc["operation"] == "rank"
    assert doc["features"][0]["id"] == F_STAR and doc["site"] == f"resid@{K}"
    patched = patch_features(subject, sae, planted_groups(), back.features(2), n_random=1,
                             progress=False)
    patched.save(tmp_path / "patch")
    again = FeaturePatchResult.load(tmp_path / "patch")
    assert again.rows == patched.rows
    np.testing.assert_array_equal(again.restoration, patched.restoration)
    assert "plotly" in (tmp_path / "patch" / "report.html").read_text()
    with pytest.raises(MechloraError, match="'patch' result, not 'rank'"):
        FeatureRanking.load(tmp_path / "patch")


# ---- file layouts ---------------------------------------------------------------------------

D, N = 16, 24


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D, N, generator=g), "W_dec": torch.randn(N, D, generator=g),
            "b_enc": torch.randn(N, generator=g), "b_dec": torch.randn(D, generator=g),
            "threshold": torch.rand(N, generator=g)}


def write(folder, name, tensors, cfg=None, cfg_name="cfg.json"):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
    if cfg is not None:
        (folder / cfg_name).write_text(json.dumps(cfg))
    return folder / name


X = torch.randn(5, D, generator=torch.Generator().manual_seed(9))


def test_gemma_scope_2_layout(tmp_path):
    w = weights()
    path = write(tmp_path, "params.safetensors", {k.lower(): v for k, v in w.items()},
                 {"hf_hook_point_in": "model.layers.3.output", "architecture": "jump_relu",
                  "width": N, "affine_connection": False}, "config.json")
    sae = load_sae(path)
    assert (sae.layout, sae.activation, sae.layer, sae.subtract_b_dec) == \
        ("gemma-scope", "jumprelu", 3, False)
    pre = X @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(sae.encode(X), torch.relu(pre) * (pre > w["threshold"]))
    torch.testing.assert_close(sae.encode(X, 5), sae.encode(X)[:, 5])
    assert load_sae(tmp_path).source == str(path)  # the folder finds its one weights file


def test_gemma_scope_1_converted_from_npz_needs_a_layer(tmp_path, tiny_text):
    path = write(tmp_path, "params.safetensors", weights())
    sae = load_sae(path)
    assert sae.activation == "jumprelu" and sae.layer is None
    with pytest.raises(MechloraError, match="does not say which layer"):
        attach_layer(sae, tiny_text, None)
    npz = tmp_path / "params.npz"
    np.savez(npz, W_enc=np.zeros((D, N)))
    with pytest.raises(MechloraError, match="safetensors files only.*allow_pickle=False"):
        load_sae(npz)


def test_saelens_layouts(tmp_path):
    w = weights()
    del w["threshold"]
    standard = load_sae(write(tmp_path / "std", "sae_weights.safetensors", w,
                              {"architecture": "standard", "d_in": D, "d_sae": N,
                               "metadata": {"hook_name": "blocks.4.hook_resid_post"}}))
    assert (standard.layout, standard.activation, standard.layer) == ("saelens", "relu", 4)
    assert standard.subtract_b_dec  # SAELens' apply_b_dec_to_input defaults to true
    torch.testing.assert_close(standard.encode(X),
                               torch.relu((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))
    topk = load_sae(write(tmp_path / "topk", "sae_weights.safetensors", w,
                          {"architecture": "topk", "k": 4, "apply_b_dec_to_input": False,
                           "hook_name": "blocks.4.hook_resid_pre"}))
    assert (topk.activation, topk.k, topk.layer) == ("topk", 4, 3)  # resid_pre 4 = resid@3
    z, pre = topk.encode(X), torch.relu(X @ w["W_enc"] + w["b_enc"])
    assert ((z != 0).sum(-1) <= 4).all()
    kept = pre.topk(4, dim=-1)
    torch.testing.assert_close(z.gather(-1, kept.indices), kept.values)
    old = load_sae(write(tmp_path / "old", "sae_weights.safetensors", w,
                         {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 2},
                          "hook_point": "blocks.1.hook_resid_post"}))
    assert (old.activation, old.k, old.layer) == ("topk", 2, 1)


def test_sparsify_and_linear_layouts(tmp_path):
    w = weights()
    sparsify = load_sae(write(tmp_path / "layers.2", "sae.safetensors",
                              {"encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"],
                               "W_dec": w["W_dec"], "b_dec": w["b_dec"]},
                              {"k": 3, "activation": "topk", "d_in": D}))
    assert (sparsify.layout, sparsify.activation, sparsify.k, sparsify.layer) == \
        ("sparsify", "topk", 3, 2)
    pre = torch.relu((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    kept = pre.topk(3, dim=-1)
    torch.testing.assert_close(sparsify.encode(X).gather(-1, kept.indices), kept.values)
    pair = {"encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"],
            "decoder.weight": w["W_dec"].T, "decoder.bias": w["b_dec"]}
    linear = load_sae(write(tmp_path / "lin", "sae.safetensors", pair), layer=1)
    assert (linear.layout, linear.activation, linear.layer) == ("linear", "relu", 1)
    torch.testing.assert_close(linear.decode(linear.encode(X)),
                               torch.relu(X @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"])
    assert load_sae(tmp_path / "lin" / "sae.safetensors", k=5).k == 5  # TopK by argument
    with pytest.raises(MechloraError, match="needs k"):
        load_sae(write(tmp_path / "nok", "s.safetensors", pair, {"architecture": "topk"}))


def test_bad_files_are_refused_naming_what_they_hold(tmp_path, tiny_text):
    w = weights()
    with pytest.raises(MechloraError, match=r"no SAE layout.*W_enc \[16, 24\].*weird \[3\]"):
        load_sae(write(tmp_path / "a", "x.safetensors", {"W_enc": w["W_enc"],
                                                          "weird": torch.zeros(3)}))
    bad = {**w, "b_enc": torch.zeros(N + 1)}
    with pytest.raises(MechloraError, match=r"inconsistent shapes.*b_enc \[25\]"):
        load_sae(write(tmp_path / "b", "x.safetensors", bad))
    with pytest.raises(MechloraError, match="transcoder"):
        load_sae(write(tmp_path / "c", "x.safetensors", {**w, "W_skip": torch.eye(D)}))
    with pytest.raises(MechloraError, match="normalisation"):
        load_sae(write(tmp_path / "d", "x.safetensors", w,
                       {"normalize_activations": "expected_average_only_in"}))
    for i, hook in enumerate(("blocks.3.hook_mlp_out", "model.layers.3.self_attn.o_proj.input",
                              "model.layers.3.post_feedforward_layernorm.output")):
        with pytest.raises(MechloraError, match="not the residual stream"):
            load_sae(write(tmp_path / f"e{i}", "x.safetensors", w,
                           {"hook_name": hook} if i == 0 else {"hf_hook_point_in": hook}))
    clt = {"hf_hook_point_in": "model.layers.3.pre_feedforward_layernorm.output",
           "hf_hook_point_out": "model.layers.3.post_feedforward_layernorm.output"}
    with pytest.raises(MechloraError, match="transcoder"):
        load_sae(write(tmp_path / "clt", "params.safetensors", w, clt, "config.json"))
    with pytest.raises(MechloraError, match="disagrees"):
        load_sae(write(tmp_path / "f", "x.safetensors", w,
                       {"hf_hook_point_in": "model.layers.3.output"}), layer=2)
    sae = load_sae(tmp_path / "f" / "x.safetensors")
    with pytest.raises(MechloraError, match="reads 16-dimensional vectors.*64 dimensions"):
        attach_layer(sae, tiny_text, None)
    with pytest.raises(MechloraError, match="not a readable safetensors"):
        (tmp_path / "g").mkdir()
        (tmp_path / "g" / "x.safetensors").write_bytes(b"not a file")
        load_sae(tmp_path / "g" / "x.safetensors")


def test_sae_dataclass_checks_its_own_shapes():
    w = weights()
    with pytest.raises(MechloraError, match="threshold"):
        SAE(**{k: v for k, v in w.items() if k != "threshold"}, activation="jumprelu")
    with pytest.raises(MechloraError, match="W_dec \\[16, 24\\]"):
        SAE(W_enc=w["W_enc"], W_dec=w["W_dec"].T, b_enc=w["b_enc"], b_dec=w["b_dec"])


# ---- command line -------------------------------------------------------------------------

run = run_cli


def test_cli_rank_patch_clamp(tmp_path, capsys):
    from mechlora.data import EXAMPLE_PATH, load_groups, write_groups

    data = tmp_path / "data" / "pairs.jsonl"
    data.parent.mkdir()
    groups = [g.__class__(**{**g.__dict__, "image": None}) for g in load_groups(EXAMPLE_PATH)[:3]]
    write_groups(data, groups)
    w = {"W_enc": torch.randn(64, N), "W_dec": torch.randn(N, 64), "b_enc": torch.zeros(N),
         "b_dec": torch.zeros(64)}
    sae = write(tmp_path / "sae", "sae_weights.safetensors", w,
                {"architecture": "standard", "hook_name": "blocks.5.hook_resid_post"})
    common = ["--model", "tiny-gemma3-text", "--sae", str(sae), "--pairs", str(data), "-q"]
    code, out, _ = run(["sae", "rank", *common, "--all-pairs", "--top", "5", "--out",
                        str(tmp_path / "rank")], capsys)
    assert code in (0, None) and "resid@5" in out
    doc = json.loads((tmp_path / "rank" / "sae.json").read_text())
    assert doc["operation"] == "rank" and len(doc["features"]) == 5
    code, out, _ = run(["sae", "patch", *common, "--ranking", str(tmp_path / "rank"), "--top",
                        "2", "--random", "1", "--min-delta", "1e-3", "--out",
                        str(tmp_path / "patch")], capsys)
    assert code in (0, None)
    doc = json.loads((tmp_path / "patch" / "sae.json").read_text())
    assert [r["name"] for r in doc["rows"]][-2:] == ["all_features", "resid"]
    assert doc["features"] == [f["id"] for f in json.loads(
        (tmp_path / "rank" / "sae.json").read_text())["features"][:2]]
    code, out, _ = run(["sae", "clamp", *common, "--feature", "0", "--value", "mean:0",
                        "--n-boot", "50", "--out", str(tmp_path / "clamp")], capsys)
    assert code in (0, None) and "accuracy" in out
    doc = json.loads((tmp_path / "clamp" / "sae.json").read_text())
    assert doc["operation"] == "clamp" and doc["value"]["spec"] == "mean:0"
    assert len((tmp_path / "clamp" / "predictions.jsonl").read_text().splitlines()) == \
        2 * sum(len(g.variants) for g in groups)
    # mistakes: one line on stderr, exit 2
    for argv, message in (
            (["sae", "patch", *common, "--features", "1", "--top", "2", "--out",
              str(tmp_path / "x")], "either --features"),
            (["sae", "rank", *common, "--layer", "4", "--out", str(tmp_path / "y")],
             "disagrees"),
            (["sae", "rank", *common, "--out", str(tmp_path / "rank")], "--overwrite"),
            (["sae", "rank", *common, "--positions", "suffix:20", "--all-pairs", "--out",
              str(tmp_path / "z")], "reach into the question: token ")):
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err
        assert err.count("\n") == 1
