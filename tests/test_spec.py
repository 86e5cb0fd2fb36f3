"""LayerSpec parsing and printing, the LoRA target regex, parameter counts on real models."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from mechlora.errors import MechloraError
from mechlora.spec import (
    DEFAULT_MODULES,
    LayerSpec,
    Plan,
    count_lora_parameters,
    match_ranks,
    plan,
    target_regex,
)

GEMMA_LAYERS = "model.language_model.layers"
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


# ---------------------------------------------------------------- parsing and printing


@pytest.mark.parametrize("text, layers", [
    ("all", tuple(range(34))),
    (" ALL ", tuple(range(34))),
    ("15-19", (15, 16, 17, 18, 19)),
    ("0-33", tuple(range(34))),
    ("3,7-9", (3, 7, 8, 9)),
    (" 3, 7 - 9 ", (3, 7, 8, 9)),
    ("16", (16,)),
    ("9-9", (9,)),
    ("33", (33,)),
    ("7-9,3,8,3", (3, 7, 8, 9)),
])
def test_parse_accepts(text: str, layers: tuple[int, ...]) -> None:
    spec = LayerSpec.parse(text, 34)
    assert spec.layers == layers
    assert spec.n_layers == 34


@pytest.mark.parametrize("text, fragment", [
    ("", "empty layer spec"),
    ("   ", "empty layer spec"),
    ("3,,4", "empty item"),
    ("3,", "empty item"),
    ("abc", "cannot read 'abc'"),
    ("1.5", "cannot read"),
    ("3-5-7", "cannot read"),
    ("3-", "cannot read"),
    ("19-15", "write 15-19"),
    ("15-40", "numbered 0-33"),
    ("34", "numbered 0-33"),
    ("-3", "negative layer"),
    ("2,-3-5", "negative layer"),
])
def test_parse_rejects(text: str, fragment: str) -> None:
    with pytest.raises(MechloraError, match=re.escape(fragment)):
        LayerSpec.parse(text, 34)


def test_out_of_range_message_names_model_size() -> None:
    with pytest.raises(MechloraError) as err:
        LayerSpec.parse("15-40", 34)
    assert "34 layers" in str(err.value) and "0-33" in str(err.value)


@pytest.mark.parametrize("spec, text", [
    (LayerSpec.all(34), "0-33"),
    (LayerSpec.of(range(15, 20), 34), "15-19"),
    (LayerSpec.of([3, 7, 8, 9], 34), "3,7-9"),
    (LayerSpec.of([0, 2, 4], 34), "0,2,4"),
    (LayerSpec.of([5, 6], 34), "5-6"),
    (LayerSpec.of([33], 34), "33"),
])
def test_str_is_compact(spec: LayerSpec, text: str) -> None:
    assert str(spec) == text
    assert LayerSpec.parse(str(spec), spec.n_layers) == spec


def test_str_round_trips_random_sets() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 50))
        chosen = rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)
        spec = LayerSpec.of(chosen.tolist(), n)
        assert LayerSpec.parse(str(spec), n) == spec


def test_is_all_and_container_protocol() -> None:
    assert LayerSpec.parse("all", 34).is_all
    assert LayerSpec.parse("0-33", 34).is_all
    assert not LayerSpec.parse("0-32", 34).is_all
    spec = LayerSpec.parse("3,7-9", 34)
    assert len(spec) == 4 and list(spec) == [3, 7, 8, 9] and 8 in spec and 4 not in spec


@pytest.mark.parametrize("layers, n_layers", [
    ((), 34), ((3, 2), 34), ((2, 2), 34), ((-1,), 34), ((34,), 34), ((0,), 0),
])
def test_direct_construction_is_validated(layers: tuple[int, ...], n_layers: int) -> None:
    with pytest.raises(MechloraError):
        LayerSpec(layers, n_layers)


def test_parse_rejects_empty_model() -> None:
    with pytest.raises(MechloraError, match="at least one layer"):
        LayerSpec.parse("all", 0)


# ---------------------------------------------------------------- target regex


def _hits(regex: str, names: list[str]) -> list[str]:
    return [n for n in names if re.fullmatch(regex, n)]


def test_regex_hits_only_chosen_layers_and_modules() -> None:
    regex = LayerSpec.parse("1,15", 34).target_regex(GEMMA_LAYERS)
    names = [f"model.language_model.layers.{i}.{block}.{m}"
             for i in (1, 11, 15, 21) for block in ("self_attn", "mlp") for m in DEFAULT_MODULES]
    hits = _hits(regex, names)
    assert all(".layers.1." in h or ".layers.15." in h for h in hits)
    assert len(hits) == 2 * 2 * len(DEFAULT_MODULES)  # each name exists under both blocks here


def test_regex_tolerates_peft_prefix_but_not_other_paths() -> None:
    regex = target_regex(GEMMA_LAYERS, [16])
    assert re.fullmatch(regex, "model.language_model.layers.16.self_attn.q_proj")
    assert re.fullmatch(regex, "base_model.model.model.language_model.layers.16.mlp.down_proj")
    assert not re.fullmatch(regex, "model.vision_tower.encoder.layers.16.self_attn.q_proj")
    assert not re.fullmatch(regex, "model.language_model.layers.16.self_attn.q_proj.lora_A")
    assert not re.fullmatch(regex, "model.language_model.layers.16.self_attn.xq_proj")
    assert not re.fullmatch(regex, "model.language_model.layers.16.self_attn")
    # a text-model path must not match inside the vision-language path
    assert not re.fullmatch(target_regex("model.layers", [16]),
                            "model.language_model.layers.16.self_attn.q_proj")


@pytest.mark.parametrize("path, modules", [("", DEFAULT_MODULES), (" . ", DEFAULT_MODULES),
                                           ("model.layers", ()), ("model.layers", ("q_proj", ""))])
def test_regex_rejects_bad_arguments(path: str, modules: tuple[str, ...]) -> None:
    with pytest.raises(MechloraError):
        target_regex(path, [0], modules)


def test_lora_config_fields() -> None:
    spec = LayerSpec.parse("15-19", 34)
    config = spec.lora_config(GEMMA_LAYERS, bias="none", task_type="CAUSAL_LM")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert config.target_modules == spec.target_regex(GEMMA_LAYERS)
    assert config.bias == "none" and config.task_type == "CAUSAL_LM"
    small = spec.lora_config("model.layers", modules=["q_proj"], r=4, alpha=8, dropout=0.0)
    assert (small.r, small.lora_alpha, small.lora_dropout) == (4, 8, 0.0)
    with pytest.raises(MechloraError, match="rank"):
        spec.lora_config(GEMMA_LAYERS, r=0)


# ---------------------------------------------------------------- MedGemma-4B on the meta device


def medgemma_config(**text_overrides) -> Gemma3Config:
    text = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                query_pre_attn_scalar=256, sliding_window=1024, vocab_size=262208)
    text.update(text_overrides)
    return Gemma3Config(
        text_config=text,
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                           num_attention_heads=16, image_size=896, patch_size=14,
                           vision_use_head=False),
        mm_tokens_per_image=256, boi_token_index=255999, eoi_token_index=256000,
        image_token_index=262144)


@pytest.fixture(scope="module")
def medgemma() -> Gemma3ForConditionalGeneration:
    with torch.device("meta"):
        return Gemma3ForConditionalGeneration(medgemma_config())


def test_medgemma_architecture(medgemma: Gemma3ForConditionalGeneration) -> None:
    assert sum(p.numel() for p in medgemma.parameters()) == 4_300_079_472
    assert len(medgemma.get_submodule(GEMMA_LAYERS)) == 34
    assert len(medgemma.get_submodule("model.vision_tower.encoder.layers")) == 27


def test_medgemma_all_layers(medgemma: Gemma3ForConditionalGeneration) -> None:
    result = plan(medgemma, LayerSpec.parse("all", 34), GEMMA_LAYERS)
    assert result == Plan(238, 29_802_496, 4_300_079_472, 29_802_496 / 4_300_079_472)
    assert f"{result.share:.2%}" == "0.69%"
    assert str(result) == "29,802,496 trainable parameters in 238 modules (0.69% of 4,300,079,472)"


def test_medgemma_window(medgemma: Gemma3ForConditionalGeneration) -> None:
    result = plan(medgemma, LayerSpec.parse("15-19", 34), GEMMA_LAYERS)
    assert (result.n_modules, result.trainable) == (35, 4_382_720)
    assert f"{result.share:.2%}" == "0.10%"


def test_medgemma_per_layer(medgemma: Gemma3ForConditionalGeneration) -> None:
    for layer in (0, 16, 33):
        spec = LayerSpec.of([layer], 34)
        assert plan(medgemma, spec, GEMMA_LAYERS).trainable == 876_544


def test_medgemma_regex_spares_vision_tower(medgemma: Gemma3ForConditionalGeneration) -> None:
    regex = LayerSpec.parse("all", 34).target_regex(GEMMA_LAYERS)
    vision = [n for n, _ in medgemma.named_modules() if "vision_tower" in n]
    assert vision and not _hits(regex, vision)
    assert count_lora_parameters(medgemma.model.vision_tower, regex) == (0, 0)


def test_plain_list_also_hits_siglip(medgemma: Gemma3ForConditionalGeneration) -> None:
    # why mechlora never uses the list form: SigLIP's q/k/v_proj share the names
    n_modules, n_params = count_lora_parameters(medgemma, list(DEFAULT_MODULES))
    assert (n_modules, n_params) == (238 + 27 * 3, 32_788_480)
    assert n_params - 29_802_496 == 2_985_984 == 27 * 3 * 16 * (1152 + 1152)


def test_count_takes_rank_from_config(medgemma: Gemma3ForConditionalGeneration) -> None:
    spec = LayerSpec.parse("15-19", 34)
    assert count_lora_parameters(medgemma, spec.lora_config(GEMMA_LAYERS, r=8)) == (35, 2_191_360)
    assert count_lora_parameters(medgemma, spec.target_regex(GEMMA_LAYERS), r=8)[1] == 2_191_360


def test_plan_errors(medgemma: Gemma3ForConditionalGeneration) -> None:
    spec = LayerSpec.parse("15-19", 34)
    with pytest.raises(MechloraError, match="no module at 'model.layers'"):
        plan(medgemma, spec, "model.layers")
    with pytest.raises(MechloraError, match="not the list of decoder layers"):
        plan(medgemma, spec, "model.language_model")
    with pytest.raises(MechloraError, match="holds 34 layers"):
        plan(medgemma, LayerSpec.parse("15-19", 26), GEMMA_LAYERS)
    with pytest.raises(MechloraError, match="no module named c_attn.*q_proj"):
        plan(medgemma, spec, GEMMA_LAYERS, modules=["q_proj", "c_attn"])


def test_count_rejects_non_linear_targets(medgemma: Gemma3ForConditionalGeneration) -> None:
    with pytest.raises(MechloraError, match="not a linear layer"):
        count_lora_parameters(medgemma, r".*language_model\.layers\.3\.mlp")


# ---------------------------------------------------------------- real tiny models with PEFT


def _lora_names(model: torch.nn.Module) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tiny_gemma3() -> Gemma3ForConditionalGeneration:
    config = Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         query_pre_attn_scalar=32, sliding_window=16, vocab_size=300),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14,
                           vision_use_head=False),
        mm_tokens_per_image=4, boi_token_index=297, eoi_token_index=298, image_token_index=299)
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(config)


def test_peft_on_tiny_gemma3_adapts_exactly_the_spec() -> None:
    model = tiny_gemma3()
    spec = LayerSpec.parse("1-2", 4)
    expected_count = plan(model, spec, GEMMA_LAYERS)
    peft_model = peft.get_peft_model(model, spec.lora_config(GEMMA_LAYERS))
    names = _lora_names(peft_model)
    expected = {f"model.language_model.layers.{i}.{BLOCK[m]}.{m}"
                for i in (1, 2) for m in DEFAULT_MODULES}
    assert names == expected
    assert not any("vision" in n for n in names)
    # per layer, r=16: q,o 64->64; k,v 64->32; gate,up 64->128; down 128->64
    per_layer = 16 * (2 * 128 + 2 * 96 + 3 * 192)
    assert _trainable(peft_model) == expected_count.trainable == 2 * per_layer
    assert expected_count.n_modules == 14
    # the regex still matches the wrapped names, so re-applying a saved adapter config works
    regex = spec.target_regex(GEMMA_LAYERS)
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert all(re.fullmatch(regex, n) for n in wrapped)


def test_peft_count_matches_on_tiny_gemma3_all_layers() -> None:
    model = tiny_gemma3()
    spec = LayerSpec.parse("all", 4)
    n_modules, n_params = count_lora_parameters(model, spec.lora_config(GEMMA_LAYERS))
    peft_model = peft.get_peft_model(model, spec.lora_config(GEMMA_LAYERS))
    assert len(_lora_names(peft_model)) == n_modules == 28
    assert _trainable(peft_model) == n_params


def test_peft_on_tiny_llama_with_chosen_modules() -> None:
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=100)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    spec = LayerSpec.parse("0,2", 3)
    modules = ("q_proj", "v_proj", "down_proj")
    counted = plan(model, spec, "model.layers", modules=modules, r=4)
    peft_model = peft.get_peft_model(model, spec.lora_config("model.layers", modules=modules, r=4))
    assert _lora_names(peft_model) == {"model.layers.0.self_attn.q_proj",
                                       "model.layers.0.self_attn.v_proj",
                                       "model.layers.0.mlp.down_proj",
                                       "model.layers.2.self_attn.q_proj",
                                       "model.layers.2.self_attn.v_proj",
                                       "model.layers.2.mlp.down_proj"}
    assert counted.n_modules == 6
    # q: 4*(32+32), v: 4*(32+16) with one kv head of 16, down: 4*(64+32); two layers
    assert counted.trainable == _trainable(peft_model) == 2 * (256 + 192 + 384)


def test_peft_on_tiny_gpt2_conv1d() -> None:
    config = GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    spec = LayerSpec.parse("1", 3)
    modules = ("c_attn", "c_proj")
    counted = plan(model, spec, "transformer.h", modules=modules)
    peft_model = peft.get_peft_model(
        model, spec.lora_config("transformer.h", modules=modules, fan_in_fan_out=True))
    assert _lora_names(peft_model) == {"transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
                                       "transformer.h.1.mlp.c_proj"}
    assert counted.trainable == _trainable(peft_model) == 16 * ((32 + 96) + (32 + 32) + (128 + 32))


def test_plain_list_on_tiny_gemma3_really_adapts_vision() -> None:
    model = tiny_gemma3()
    config = peft.LoraConfig(r=16, target_modules=list(DEFAULT_MODULES))
    n_modules, n_params = count_lora_parameters(model, config)
    peft_model = peft.get_peft_model(model, config)
    names = _lora_names(peft_model)
    assert sum("vision_tower" in n for n in names) == 2 * 3  # q, k, v of both SigLIP layers
    assert len(names) == n_modules and _trainable(peft_model) == n_params


# ---------------------------------------------------------------- matched parameter counts


def test_medgemma_all_layers_matched_to_the_window_exactly(medgemma) -> None:
    match = match_ranks(medgemma, LayerSpec.all(34), LayerSpec.parse("15-19", 34), GEMMA_LAYERS)
    assert match.target == 4_382_720 and match.trainable == 4_382_720 and match.exact
    assert sorted(Counter(match.ranks.values()).items()) == [(2, 22), (3, 12)]
    assert match.step == 54_784 == 876_544 // 16
    # the extra rank is spread over the depth: at most 2 layers at r=2 between two at r=3
    threes = [layer for layer, rank in match.ranks.items() if rank == 3]
    assert max(np.diff(threes)) <= 3 and threes[0] <= 2 and threes[-1] >= 31
    assert str(match) == ("0-33 (34 layers: 22 at r=2 and 12 at r=3): 4,382,720 trainable "
                          "parameters; 15-19 at r=16: 4,382,720; difference +0 (one rank step "
                          "of one layer: 54,784)")
    # the config PEFT gets counts the same, with the recipe's scaling alpha / r = 2 everywhere
    config = LayerSpec.all(34).lora_config(GEMMA_LAYERS, ranks=match.ranks)
    assert (config.r, config.lora_alpha) == (2, 4)
    assert list(config.rank_pattern.values()) == [3] and list(config.alpha_pattern.values()) == [6]
    assert count_lora_parameters(medgemma, config) == (238, 4_382_720)
    assert plan(medgemma, LayerSpec.all(34), GEMMA_LAYERS, ranks=match.ranks).trainable == \
        4_382_720


def test_matched_count_on_the_medgemma_preset() -> None:
    from mechlora.models.presets import medgemma_4b

    model, _ = medgemma_4b()  # meta device, bf16: shapes only
    match = match_ranks(model, LayerSpec.all(34), LayerSpec.parse("15-19", 34), GEMMA_LAYERS)
    assert (match.trainable, match.target, match.difference) == (4_382_720, 4_382_720, 0)


@pytest.mark.parametrize("spec, reference", [("15-19", "all"), ("0-9", "15-19"), ("3", "0-1"),
                                             ("0,10,20,30", "15-19"), ("all", "0-2")])
def test_medgemma_matches_within_one_rank_step(medgemma, spec: str, reference: str) -> None:
    target, ref = LayerSpec.parse(spec, 34), LayerSpec.parse(reference, 34)
    match = match_ranks(medgemma, target, ref, GEMMA_LAYERS)
    assert match.target == plan(medgemma, ref, GEMMA_LAYERS).trainable
    assert abs(match.difference) <= match.step
    assert match.trainable == plan(medgemma, target, GEMMA_LAYERS, ranks=match.ranks).trainable
    assert set(match.ranks) == set(target.layers) and max(match.ranks.values()) - min(
        match.ranks.values()) <= 1
    # the closest achievable count: one layer more or less at the higher rank is further away
    assert abs(match.difference) <= match.step / 2


def test_match_to_a_count_and_errors(medgemma) -> None:
    match = match_ranks(medgemma, LayerSpec.parse("0-9", 34), 1_000_000, GEMMA_LAYERS)
    assert match.reference == "the reference count" and abs(match.difference) <= 54_784 / 2
    assert match.trainable == 986_112 and match.difference == -13_888
    with pytest.raises(MechloraError, match="already holds 1,862,656 parameters"):
        match_ranks(medgemma, LayerSpec.all(34), LayerSpec.parse("16", 34), GEMMA_LAYERS)
    with pytest.raises(MechloraError, match="positive parameter count"):
        match_ranks(medgemma, LayerSpec.all(34), 0, GEMMA_LAYERS)
    with pytest.raises(MechloraError, match="holds 34 layers"):
        match_ranks(medgemma, LayerSpec.all(30), LayerSpec.parse("16", 34), GEMMA_LAYERS)


def test_lora_config_rank_errors() -> None:
    spec = LayerSpec.parse("1-2", 4)
    with pytest.raises(MechloraError, match="not in the spec 1-2"):
        spec.lora_config(GEMMA_LAYERS, ranks={0: 2})
    with pytest.raises(MechloraError, match="whole number >= 1"):
        spec.lora_config(GEMMA_LAYERS, ranks={1: 0})
    with pytest.raises(MechloraError, match="whole number >= 1"):
        spec.lora_config(GEMMA_LAYERS, ranks={1: 2.5})
    # without ranks the config is unchanged: no patterns
    config = spec.lora_config(GEMMA_LAYERS, r=8, alpha=16)
    assert (config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern) == \
        (8, 16, {}, {})


def test_peft_builds_the_matched_ranks_on_tiny_gemma3(tmp_path) -> None:
    model = tiny_gemma3()
    match = match_ranks(model, LayerSpec.all(4), LayerSpec.parse("2", 4), GEMMA_LAYERS, r=6)
    assert match.exact and sorted(match.ranks.values()) == [1, 1, 2, 2]
    config = LayerSpec.all(4).lora_config(GEMMA_LAYERS, r=6, alpha=12, ranks=match.ranks)
    peft_model = peft.get_peft_model(model, config)
    assert _trainable(peft_model) == match.trainable == match.target
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert module.r["default"] == match.ranks[layer]
            assert module.scaling["default"] == pytest.approx(12 / 6)  # the recipe's scaling
    # the saved adapter reloads with the same ranks
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(tiny_gemma3(), str(tmp_path / "adapter"),
                                              is_trainable=True)
    assert _trainable(reloaded) == match.trainable
