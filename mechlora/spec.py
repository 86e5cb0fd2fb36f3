"""Which decoder layers to adapt, and the PEFT config that adapts exactly those.

A `LayerSpec` is a validated, sorted set of language-layer indices. Its `lora_config` builds a regex
`target_modules` anchored on the decoder-layer list, because PEFT's plain list form
(`["q_proj", ...]`) matches by name suffix anywhere in the model: on Gemma 3 it also adapts the
SigLIP vision tower, whose attention projections share those names.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import peft
import torch
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn

from mechlora.errors import MechloraError

DEFAULT_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
DEFAULT_R = 16
DEFAULT_ALPHA = 32
DEFAULT_DROPOUT = 0.05

_SPEC_HELP = "write 'all', a layer '16', a range '15-19', or a list '3,7-9'"
_ITEM = re.compile(r"(\d+)(?:\s*-\s*(\d+))?")
_NEGATIVE = re.compile(r"-\s*\d+(\s*-\s*\d+)?")


@dataclass(frozen=True)
class LayerSpec:
    """Sorted, unique layer indices, validated against a model with `n_layers` language layers."""

    layers: tuple[int, ...]
    n_layers: int

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise MechloraError(f"a model needs at least one layer, got n_layers={self.n_layers}")
        if not self.layers:
            raise MechloraError(f"a layer spec needs at least one layer; {_SPEC_HELP}")
        if list(self.layers) != sorted(set(self.layers)):
            raise MechloraError(f"layers must be sorted and unique, got {self.layers}; "
                                "use LayerSpec.of(...) to normalise")
        if self.layers[0] < 0 or self.layers[-1] >= self.n_layers:
            raise MechloraError(f"layers {self.layers} fall outside 0-{self.n_layers - 1}, "
                                f"the {self.n_layers} layers of this model")

    @classmethod
    def of(cls, layers: Sequence[int], n_layers: int) -> LayerSpec:
        """Build from any iterable of indices: sorts and merges duplicates."""
        return cls(tuple(sorted({int(i) for i in layers})), n_layers)

    @classmethod
    def all(cls, n_layers: int) -> LayerSpec:
        return cls(tuple(range(n_layers)), n_layers)

    @classmethod
    def parse(cls, text: str, n_layers: int) -> LayerSpec:
        """Parse 'all', '15-19', '3,7-9' (spaces allowed) for a model with `n_layers` layers."""
        if n_layers < 1:
            raise MechloraError(f"a model needs at least one layer, got n_layers={n_layers}")
        stripped = text.strip()
        if not stripped:
            raise MechloraError(f"empty layer spec; {_SPEC_HELP}")
        if stripped.lower() == "all":
            return cls.all(n_layers)
        layers: set[int] = set()
        for item in stripped.split(","):
            layers.update(_parse_item(item.strip(), text, n_layers))
        return cls.of(layers, n_layers)

    @property
    def is_all(self) -> bool:
        return len(self.layers) == self.n_layers

    def __str__(self) -> str:
        return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in _runs(self.layers))

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __contains__(self, layer: object) -> bool:
        return layer in self.layers

    def target_regex(self, layers_path: str, modules: Sequence[str] = DEFAULT_MODULES) -> str:
        """The PEFT `target_modules` regex for these layers; see `target_regex`."""
        return target_regex(layers_path, self.layers, modules)

    def lora_config(self, layers_path: str, *, modules: Sequence[str] = DEFAULT_MODULES,
                    r: int = DEFAULT_R, alpha: float = DEFAULT_ALPHA,
                    dropout: float = DEFAULT_DROPOUT, ranks: Mapping[int, int] | None = None,
                    **kw) -> peft.LoraConfig:
        """A LoraConfig adapting `modules` of exactly these layers under `layers_path`.

        `layers_path` is the dotted path of the decoder-layer ModuleList from the root model:
        "model.language_model.layers" (Gemma 3 vision-language, transformers 5.x),
        "model.layers" (Gemma 3 text / Llama), "transformer.h" (GPT-2). Extra keyword arguments go
        to `peft.LoraConfig` unchanged.

        `ranks` ({layer: rank}, e.g. `match_ranks(...).ranks`) gives layers their own rank; the
        others keep `r`. PEFT then gets the most common rank as its `r` and the rest through
        `rank_pattern`, and `alpha_pattern` gives every layer alpha * rank / r, so that each
        keeps the scaling alpha / r of the recipe: only the capacity changes, not the step size.
        """
        if r < 1:
            raise MechloraError(f"LoRA rank r must be at least 1, got {r}")
        per_layer = self._ranks(ranks, r)
        default = min(Counter(per_layer.values()).most_common(),
                      key=lambda item: (-item[1], item[0]))[0]
        others: dict[int, list[int]] = {}
        for layer, rank in per_layer.items():
            if rank != default:
                others.setdefault(rank, []).append(layer)
        rank_pattern = {target_regex(layers_path, layers, modules): rank
                        for rank, layers in sorted(others.items())}
        alpha_pattern = {key: _scaled(alpha, rank, r) for key, rank in rank_pattern.items()}
        extra = dict(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern) if others else {}
        return peft.LoraConfig(r=default, lora_alpha=_scaled(alpha, default, r),
                               lora_dropout=dropout,
                               target_modules=self.target_regex(layers_path, modules),
                               **extra, **kw)

    def _ranks(self, ranks: Mapping[int, int] | None, r: int) -> dict[int, int]:
        per_layer = dict.fromkeys(self.layers, r)
        for layer, rank in (ranks or {}).items():
            if layer not in per_layer:
                raise MechloraError(f"ranks name layer {layer}, which is not in the spec {self}")
            if isinstance(rank, bool) or int(rank) != rank or rank < 1:
                raise MechloraError(f"layer {layer}: a LoRA rank must be a whole number >= 1, "
                                    f"got {rank!r}")
            per_layer[layer] = int(rank)
        return per_layer


def _scaled(alpha: float, rank: int, r: int) -> float:
    """alpha * rank / r, as an int when whole (PEFT's configs usually hold ints)."""
    value = alpha * rank / r
    return int(value) if float(value).is_integer() else value


def _parse_item(item: str, text: str, n_layers: int) -> range:
    last = n_layers - 1
    if not item:
        raise MechloraError(f"empty item in layer spec {text!r}; {_SPEC_HELP}")
    if _NEGATIVE.fullmatch(item):
        raise MechloraError(f"negative layer {item!r} in {text!r}: layers are numbered 0-{last}")
    match = _ITEM.fullmatch(item)
    if match is None:
        raise MechloraError(f"cannot read {item!r} in layer spec {text!r}; {_SPEC_HELP}")
    lo = int(match.group(1))
    hi = lo if match.group(2) is None else int(match.group(2))
    if hi < lo:
        raise MechloraError(f"reversed range {item!r} in {text!r}; write {hi}-{lo}")
    if hi > last:
        raise MechloraError(f"layer {hi} in {text!r} is out of range: this model has "
                            f"{n_layers} layers, numbered 0-{last}")
    return range(lo, hi + 1)


def _runs(layers: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs as (first, last) pairs: (3, 7, 8, 9) -> [(3, 3), (7, 9)]."""
    runs: list[tuple[int, int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def target_regex(layers_path: str, layers: Sequence[int],
                 modules: Sequence[str] = DEFAULT_MODULES) -> str:
    """A regex that PEFT fullmatches against module names, hitting only `modules` in `layers`.

    The optional leading `(.*\\.)?` keeps it valid once the model is wrapped (PEFT prepends
    "base_model.model."); the path must then follow a dot, so "model.layers" never matches inside
    "model.language_model.layers" and neither matches "model.vision_tower.encoder.layers".
    """
    path = layers_path.strip().strip(".")
    if not path:
        raise MechloraError("layers_path is empty; give the dotted path of the decoder-layer "
                            "list, e.g. 'model.language_model.layers' or 'model.layers'")
    if not layers:
        raise MechloraError("no layers to adapt; give at least one layer")
    names = [m.strip() for m in modules]
    if not names or not all(names):
        raise MechloraError(f"modules must be non-empty names such as {', '.join(DEFAULT_MODULES)}")
    idx = "|".join(str(i) for i in layers)
    mods = "|".join(re.escape(m) for m in names)
    return rf"(.*\.)?{re.escape(path)}\.({idx})\.(.*\.)?({mods})"


def count_lora_parameters(model: nn.Module, target: peft.LoraConfig | str | Sequence[str],
                          r: int | None = None) -> tuple[int, int]:
    """(modules matched, LoRA parameters) that PEFT would add, without building any weights.

    `target` is a LoraConfig, a regex string, or a plain name list (PEFT's suffix matching).
    Each matched module adds rank * (in + out) parameters (A: rank x in, B: out x rank); reading
    only shapes makes this work on a `meta`-device model. The rank is `r` when given, else the
    config's, per module when it has a `rank_pattern` (looked up as PEFT does), else 16.
    """
    config = target if isinstance(target, peft.LoraConfig) else peft.LoraConfig(
        r=DEFAULT_R, target_modules=target if isinstance(target, str) else list(target))
    n_modules = n_params = 0
    for name, module in model.named_modules():
        if not _matches(config, name):
            continue
        n_modules += 1
        n_params += (r or _rank(config, name)) * sum(_weight_shape(name, module))
    return n_modules, n_params


def _rank(config: peft.LoraConfig, name: str) -> int:
    if not config.rank_pattern:
        return config.r
    return config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), name), config.r)


def _matches(config: peft.LoraConfig, name: str) -> bool:
    # PEFT's own matcher, so list forms, layers_to_transform and exclude_modules behave the same
    # (an excluded module comes back as a falsy marker).
    return bool(check_target_module_exists(config, name))


def _weight_shape(name: str, module: nn.Module) -> tuple[int, int]:
    # Linear (out, in), GPT-2 Conv1D (in, out), Embedding (num, dim): the sum is in + out anyway.
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise MechloraError(f"the LoRA target matches {name} ({type(module).__name__}), which is "
                            "not a linear layer; name projections such as q_proj, not blocks")
    return int(weight.shape[0]), int(weight.shape[1])


@dataclass(frozen=True)
class Plan:
    """What a LoRA run on a spec costs: adapted modules, trainable parameters, base size."""

    n_modules: int
    trainable: int
    base_params: int
    share: float

    def __str__(self) -> str:
        return (f"{self.trainable:,} trainable parameters in {self.n_modules} modules "
                f"({self.share:.2%} of {self.base_params:,})")


def plan(model: nn.Module, spec: LayerSpec, layers_path: str,
         modules: Sequence[str] = DEFAULT_MODULES, r: int = DEFAULT_R,
         ranks: Mapping[int, int] | None = None) -> Plan:
    """Check `spec` against the model's layer list and count what LoRA on it would train.

    `ranks` are per-layer ranks as `LayerSpec.lora_config` takes them. Works on a `meta`-device
    model, so a dry run needs no weights.
    """
    layer_list = _layer_list(model, layers_path)
    if len(layer_list) != spec.n_layers:
        raise MechloraError(f"{layers_path} holds {len(layer_list)} layers but the spec {spec} was "
                            f"checked against {spec.n_layers}; re-parse it for this model")
    missing = [m for m in modules
               if count_lora_parameters(model, spec.target_regex(layers_path, [m]), r)[0] == 0]
    if missing:
        raise MechloraError(f"no module named {', '.join(missing)} in layers {spec} of "
                            f"{layers_path}; pick module names from: "
                            f"{', '.join(_linear_names(layer_list[spec.layers[0]]))}")
    config = spec.lora_config(layers_path, modules=modules, r=r, ranks=ranks)
    n_modules, trainable = count_lora_parameters(model, config)
    base = sum(p.numel() for p in model.parameters())
    return Plan(n_modules, trainable, base, trainable / base)


def _layer_list(model: nn.Module, layers_path: str) -> nn.ModuleList:
    try:
        layer_list = model.get_submodule(layers_path.strip().strip("."))
    except AttributeError:
        raise MechloraError(f"the model has no module at {layers_path!r}; give the dotted path of "
                            "its decoder-layer list, e.g. 'model.language_model.layers' "
                            "(Gemma 3 vision-language) or 'model.layers' (text models)") from None
    if not isinstance(layer_list, nn.ModuleList):
        raise MechloraError(f"{layers_path!r} is a {type(layer_list).__name__}, not the list of "
                            "decoder layers; point at the ModuleList that holds them")
    return layer_list


def _linear_names(layer: nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in layer.named_modules()
             if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2}
    return sorted(names)


# ---- matched parameter counts ---------------------------------------------------------------


@dataclass(frozen=True)
class RankMatch:
    """Per-layer LoRA ranks on `spec` whose trainable count matches a reference count.

    Use it as `spec.lora_config(layers_path, r=r, ranks=match.ranks)` (r: the recipe's rank, so
    that alpha / rank stays the recipe's scaling); `lora_config` turns the ranks into PEFT's
    `r`, `rank_pattern` and `alpha_pattern`.
    """

    spec: LayerSpec
    ranks: dict[int, int]      # every layer of `spec` -> its rank
    trainable: int             # LoRA parameters with these ranks
    target: int                # the reference count
    reference: str             # what the target is, e.g. "15-19 at r=16"
    step: int                  # parameters of one rank step of the largest layer

    @property
    def difference(self) -> int:
        return self.trainable - self.target

    @property
    def exact(self) -> bool:
        return self.trainable == self.target

    def __str__(self) -> str:
        groups = Counter(self.ranks.values())
        ranks = " and ".join(f"{n} at r={rank}" for rank, n in sorted(groups.items(),
                                                                     key=lambda kv: -kv[1]))
        layers = f"{len(self.spec)} layer{'s' if len(self.spec) > 1 else ''}"
        return (f"{self.spec} ({layers}: {ranks}): {self.trainable:,} trainable "
                f"parameters; {self.reference}: {self.target:,}; difference "
                f"{self.difference:+,} (one rank step of one layer: {self.step:,})")


def match_ranks(model: nn.Module, spec: LayerSpec, reference: LayerSpec | int, layers_path: str,
                *, modules: Sequence[str] = DEFAULT_MODULES, r: int = DEFAULT_R) -> RankMatch:
    """Ranks for LoRA on `spec` that hold as many parameters as `reference` at rank `r`.

    `reference` is a layer spec (counted at rank `r` on `modules`) or a parameter count. Every
    layer gets the same base rank, and the remainder goes one rank step at a time to layers
    spread evenly across the spec, so no depth gets extra capacity. The count is exact when the
    remainder is a whole number of rank steps (always, when the layers are alike: on MedGemma-4B,
    all 34 layers with 22 at r=2 and 12 at r=3 hold the 4,382,720 of 15-19 at r=16); otherwise
    it is within one rank step of one layer. Works on a `meta`-device model.
    """
    if r < 1:
        raise MechloraError(f"LoRA rank r must be at least 1, got {r}")
    plan(model, spec, layers_path, modules, r)  # checks the path, the layer count, the modules
    unit = {layer: count_lora_parameters(model, target_regex(layers_path, [layer], modules), 1)[1]
            for layer in spec}
    if isinstance(reference, LayerSpec):
        plan(model, reference, layers_path, modules, r)
        target = sum(r * count_lora_parameters(model, target_regex(layers_path, [layer], modules),
                                                1)[1] for layer in reference)
        what = f"{reference} at r={r}"
    elif isinstance(reference, int) and not isinstance(reference, bool) and reference > 0:
        target, what = reference, "the reference count"
    else:
        raise MechloraError(f"the reference must be a layer spec or a positive parameter count, "
                            f"got {reference!r}")
    base = target // sum(unit.values())
    if base < 1:
        raise MechloraError(f"LoRA at rank 1 on {spec} already holds {sum(unit.values()):,} "
                            f"parameters, more than {what} ({target:,}); match on fewer layers")
    ranks = dict.fromkeys(spec.layers, base)
    left = target - base * sum(unit.values())
    by_size: dict[int, list[int]] = {}
    for layer, size in unit.items():
        by_size.setdefault(size, []).append(layer)
    # Largest layers first; each size group spreads its extra steps evenly over its depth.
    for size, layers in sorted(by_size.items(), reverse=True):
        extra = min(len(layers), left // size)
        left -= extra * size
        for layer in _spread(layers, extra):
            ranks[layer] += 1
    # One more step past the target when that lands closer to it.
    open_sizes = [(size, layers) for size, layers in sorted(by_size.items())
                  if any(ranks[layer] == base for layer in layers)]
    if left and open_sizes and open_sizes[0][0] - left < left:
        size, layers = open_sizes[0]
        free = [layer for layer in layers if ranks[layer] == base]
        ranks[free[len(free) // 2]] += 1
        left -= size
    return RankMatch(spec, ranks, target - left, target, what, max(unit.values()))


def _spread(layers: Sequence[int], k: int) -> list[int]:
    """k of `layers` spread evenly: the one nearest the middle of each of k equal parts."""
    n = len(layers)
    return [layers[int((i + 0.5) * n / k)] for i in range(k)]
