"""Before and after training: the adapted model localizes on the base's pairs in the base's
units, PEFT-wrapped models hook the right modules, and a planted divergence removed by an
adapter shows up as removed at the trained layer (and an untrained adapter as removed
nowhere)."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model

from mechlora.before_after import adapted, adapted_layers, compare_localizations, localize_adapter
from mechlora.errors import MechloraError
from mechlora.localize import localize
from mechlora.models import wrap
from mechlora.report.localize import write_localize_report
from mechlora.result import LocalizationResult
from mechlora.spec import LayerSpec
from tests.planted import more_groups, planted_subject

KW = dict(progress=False, logit_lens=False)
K = 2  # the planted gate's layer


@pytest.fixture(scope="module")
def planted():
    return planted_subject(K, n_layers=5, slope=2.0, groups=more_groups())


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    """An adapter trained (mechlora.train, CE + KL) on the attention of layer K only."""
    from mechlora.train import train_arm
    from mechlora.training.config import TrainConfig

    out = tmp_path_factory.mktemp("arm") / "adapter"
    cfg = TrainConfig(lr=1e-2, grad_accum=1, batch_size=6, epochs=30, save_every=0,
                      modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    train_arm(planted, more_groups(), out, layers=str(K), config=cfg, progress=False)
    return out


def _untrained(subject, path):
    """A LoRA adapter straight from PEFT's init (B = 0): the model's function unchanged."""
    spec = LayerSpec.of([0, 1, 2, 3], subject.n_layers)
    model = get_peft_model(subject.model, spec.lora_config(subject.layers_path))
    model.save_pretrained(path)
    model.unload()
    return path


def _state(model):
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def test_the_adapter_removes_the_divergence_at_its_layer(planted, trained, tmp_path):
    base = localize(planted, more_groups(), **KW)
    assert base.n_pairs == 12 and base.mean("mlp")[K] > 0.95
    before = _state(planted.model)
    after = localize(planted, more_groups(), adapter=trained, baseline=base, **KW)
    assert _state(planted.model) == before  # the adapter is gone again
    assert after.settings["adapted_layers"] == [K] and after.settings["adapter"] == str(trained)
    np.testing.assert_array_equal(after.gap, base.margin_a - base.margin_b)
    comparison = compare_localizations(base, after)
    assert comparison.trained_layers == (K,)
    left = comparison.remaining()
    assert abs(left["mean"]) < 0.1 and left["ci_high"] < 0.2
    assert comparison.shrank_at() == ([K], "interval")
    shrink = comparison.shrink("mlp")
    assert shrink["mean"][K] > 0.9 and shrink["ci_low"][K] > 0.8
    verdict = comparison.verdict()
    assert f"shrank at the trained layers {K} and nowhere else" in verdict
    # files: comparison.json and the report's section
    comparison_doc = comparison.summary()
    assert comparison_doc["shrank_at"] == [K] and comparison_doc["trained_layers"] == [K]
    after.save(tmp_path / "after")
    base.save(tmp_path / "base")
    again = compare_localizations(tmp_path / "base", tmp_path / "after")
    assert again.verdict() == verdict
    page = write_localize_report(after, tmp_path / "report.html", comparison=comparison)
    assert "Before and after training" in page.read_text()


def test_an_untrained_adapter_shrinks_nothing(planted, tmp_path):
    base = localize(planted, more_groups(), **KW)
    comparison = localize_adapter(planted, more_groups(), _untrained(planted, tmp_path / "u"),
                                  base, **KW)
    assert comparison.trained_layers == (0, 1, 2, 3)
    np.testing.assert_allclose(comparison.remaining()["mean"], 1, atol=1e-5)
    assert comparison.shrank_at()[0] == []
    assert "shrank nowhere" in comparison.verdict()


@pytest.mark.parametrize("engine", ["cached", "batched", "nnsight"])
def test_a_peft_model_localizes_like_its_merged_weights(planted, trained, engine):
    """Sites under PEFT are the base model's modules with the LoRA layers inside them: every
    site (heads included: o_proj is a LoRA layer here) must give the merged model's numbers."""
    model = PeftModel.from_pretrained(planted.model, str(trained))
    try:
        peft = wrap(model, planted.processor, name="peft")
        assert adapted_layers(peft) == (K,)
        kw = dict(heads=True, min_delta=1e-3, **KW)
        with_lora = localize(peft, more_groups()[:2], engine=engine, **kw)
        merged = wrap(_merged_copy(model), planted.processor)
        reference = localize(merged, more_groups()[:2], engine="full", **kw)
    finally:
        model.unload()
    assert with_lora.pair_ids == reference.pair_ids and with_lora.n_pairs >= 2
    np.testing.assert_allclose(with_lora.margin_a, reference.margin_a, atol=1e-4)
    for c in with_lora.components:
        np.testing.assert_allclose(with_lora.restoration[c], reference.restoration[c], atol=1e-3)
    np.testing.assert_allclose(with_lora.heads, reference.heads, atol=1e-3)


def _merged_copy(peft_model):
    """The adapter's weights merged into a copy of the base model."""
    import copy

    clone = copy.deepcopy(peft_model)
    return clone.merge_and_unload()


def test_baseline_mode_refuses_what_cannot_compare(planted, tmp_path):
    base = localize(planted, more_groups(), **KW)
    with pytest.raises(MechloraError, match="pairs of the baseline are not in these pairs"):
        localize(planted, more_groups()[:2], baseline=base, **KW)
    with pytest.raises(MechloraError, match="positions 'last', not 'suffix:3'"):
        localize(planted, more_groups(), baseline=base, positions="suffix:3", **KW)
    with pytest.raises(MechloraError, match="not run against this baseline"):
        compare_localizations(base, base)
    with pytest.raises(MechloraError, match="not a PEFT adapter folder"):
        localize(planted, more_groups(), adapter=tmp_path, **KW)
    with adapted(planted, _untrained(planted, tmp_path / "u")) as with_lora:
        with pytest.raises(MechloraError, match="already carries a PEFT adapter"):
            localize(with_lora, more_groups(), adapter=tmp_path / "u", **KW)
    assert not isinstance(planted.model, PeftModel)


def test_adapted_run_keeps_pairs_the_adapted_model_no_longer_separates(planted, trained,
                                                                       tmp_path):
    """After training the two wordings nearly agree (|m'(a) - m'(b)| < min_delta): a run of
    its own would exclude them; against the baseline every base pair stays, in base units."""
    own = localize(planted, more_groups(), adapter=trained, **KW)
    assert own.n_pairs < 12
    base = localize(planted, more_groups(), **KW)
    vs_base = localize(planted, more_groups(), adapter=trained, baseline=base, **KW)
    assert vs_base.pair_ids == base.pair_ids and not vs_base.excluded
    doc = json.loads((vs_base.save(tmp_path) / "localization.json").read_text())
    assert doc["normalization"]["by"] == "baseline"
    np.testing.assert_array_equal(LocalizationResult.load(tmp_path).gap, vs_base.gap)


def test_float_noise_is_not_a_shrink(planted):
    """The same model through another engine, with a consistent drop at layer 0 of float-noise
    size (1e-7 of the gap, every pair: its interval lies above 0), shrank nowhere; the same
    drop at 2% of the gap, above MIN_SHRINK, is found at layer 0."""
    from mechlora.before_after import MIN_SHRINK

    base = localize(planted, more_groups(), **KW)
    same = localize(planted, more_groups(), baseline=base, engine="full", **KW)
    noise = np.random.default_rng(0).uniform(1.0, 2.0, base.n_pairs)
    for drop, found in ((1e-7, []), (2 * MIN_SHRINK, [0])):
        adapted = same.subset(np.arange(same.n_pairs))
        adapted.restoration = {c: v.copy() for c, v in same.restoration.items()}
        adapted.restoration["resid"][:, 0] -= drop * noise
        comparison = compare_localizations(base, adapted)
        assert comparison.score_shrink()["ci_low"][0] > 0
        assert comparison.shrank_at() == (found, "interval")
    comparison = compare_localizations(base, same)
    assert comparison.shrank_at() == ([], "interval")
    assert "shrank nowhere" in comparison.verdict()


def test_a_baseline_of_another_model_components_or_reading_is_refused(planted, tmp_path):
    """Base and adapted runs must measure the same layers, components and choice reading:
    else the comparison subtracts arrays of other shapes or other units."""
    import dataclasses

    from mechlora.compare.localize_arms import localize_run

    base = localize(planted, more_groups(), components=["resid", "mlp"], **KW)
    assert base.settings["choice_reading"] == "first"
    other = dataclasses.replace(base, n_layers=7, model="other")
    with pytest.raises(MechloraError, match=r"baseline \(other\): layers 7 there, 5 in this run"):
        localize(planted, more_groups(), baseline=other, components=["resid", "mlp"], **KW)
    with pytest.raises(MechloraError, match="components mlp,resid there, resid in this run"):
        localize(planted, more_groups(), baseline=base, components=["resid"], **KW)
    with pytest.raises(MechloraError, match="choice reading first there, merged in this run"):
        localize(planted, more_groups(), baseline=base, components=["resid", "mlp"],
                 merge_variants=True, **KW)
    with pytest.raises(MechloraError, match="choice reading first there, merged in this comp"):
        localize_run(planted, more_groups(), base, tmp_path, "sha", merge_variants=True,
                     progress=False)
    after = localize(planted, more_groups(), baseline=base, components=["resid", "mlp"], **KW)
    compare_localizations(base, after)  # the same setup compares
    fewer = dataclasses.replace(after, components=("resid",),
                                restoration={"resid": after.restoration["resid"]})
    with pytest.raises(MechloraError, match="components mlp,resid there, resid in the adapted"):
        compare_localizations(base, fewer)
    with pytest.raises(MechloraError, match="layers 7 there, 5 in the adapted localization"):
        compare_localizations(other, after)


def test_an_adapter_for_another_model_is_refused_and_the_model_left_as_it_was(planted, tmp_path):
    """An adapter whose weights have another width (another base model), or whose modules
    this model lacks: PEFT has already wrapped the layers when it fails; they are put back."""
    from safetensors.torch import load_file, save_file

    path = _untrained(planted, tmp_path / "wide")
    weights = load_file(path / "adapter_model.safetensors")
    # twice as wide: lora_A [r, in] along its input, lora_B [out, r] along its output
    save_file({k: torch.cat([v, v], dim=1 if "lora_A" in k else 0) for k, v in weights.items()},
              path / "adapter_model.safetensors")
    config = json.loads((path / "adapter_config.json").read_text())
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "adapter_config.json").write_text(json.dumps(
        {**config, "target_modules": ["no_such_proj"], "layers_to_transform": None,
         "layers_pattern": None}))
    before = _state(planted.model)
    logits = planted.model(**planted.encode(["Is it?"], [None])).logits
    for folder, detail in ((path, "size mismatch"), (tmp_path / "alien", "no_such_proj")):
        with pytest.raises(MechloraError, match=f"does not fit this model.*{detail}"):
            localize(planted, more_groups(), adapter=folder, **KW)
        assert _state(planted.model) == before and not hasattr(planted.model, "peft_config")
    assert torch.equal(planted.model(**planted.encode(["Is it?"], [None])).logits, logits)

