"""`load_sae`: a sparse autoencoder from a safetensors file, in the layouts people publish.

- Gemma Scope 2 (Gemma 3): `params.safetensors` with `w_enc` [d, n], `w_dec` [n, d], `b_enc`,
  `b_dec`, `threshold`; `config.json` beside it (`hf_hook_point_in`, `architecture: jump_relu`).
- Gemma Scope 1 (Gemma 2), its `params.npz` converted to safetensors: `W_enc`, `W_dec`,
  `b_enc`, `b_dec`, `threshold`, no config.
- SAELens: `sae_weights.safetensors` with `W_enc`, `W_dec`, `b_enc`, `b_dec` (+ `threshold`
  for jumprelu); `cfg.json` (`architecture`, `k`, `apply_b_dec_to_input`, `hook_name`).
- EleutherAI sparsify (TopK): `sae.safetensors` with `encoder.weight` [n, d], `encoder.bias`,
  `W_dec` [n, d], `b_dec`; `cfg.json` (`k`); the folder is named after the hookpoint.
- A torch `nn.Linear` pair (plain ReLU): `encoder.weight` [n, d], `encoder.bias`,
  `decoder.weight` [d, n], `decoder.bias`; config optional.

Files are read with safetensors only: nothing is unpickled. Which residual site the SAE reads
comes from its config (`hf_hook_point_in` `model.layers.L.output`, `hook_name`
`blocks.L.hook_resid_post`, both resid@L; `blocks.L.hook_resid_pre` is resid@(L-1)).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mechlora.errors import MechloraError
from mechlora.sae.model import SAE

CONFIG_NAMES = ("cfg.json", "config.json")
MATRIX_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec"}
LINEAR_KEYS = {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}
SPARSIFY_KEYS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
OPTIONAL_KEYS = {"threshold", "log_threshold", "scaling_factor"}
LAYOUT_HELP = ("W_enc/W_dec/b_enc/b_dec[/threshold] (Gemma Scope, SAELens; lower-case w_ too), "
               "encoder.weight/encoder.bias/W_dec/b_dec (EleutherAI sparsify), "
               "encoder.weight/encoder.bias/decoder.weight/decoder.bias (nn.Linear pair)")
CONVERT_NPZ = ("python -c \"import numpy as np; from safetensors.numpy import save_file; "
               "save_file(dict(np.load('params.npz', allow_pickle=False)), "
               "'params.safetensors')\"")


def load_sae(path: str | Path, *, k: int | None = None, layer: int | None = None,
             device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = torch.float32) -> SAE:
    """Load an SAE from a safetensors file (or a folder holding one), in any layout above.

    `k`: the TopK size when no config says it (or to override it). `layer`: the residual
    layer it reads when no config says it (it must agree when one does). `dtype`: the
    weights' dtype (default float32, as Gemma Scope publishes them; None keeps the file's).
    """
    file = _weights_file(Path(path))
    tensors = _read(file)
    cfg, cfg_file = _config(file)
    keys = set(tensors)
    if "W_skip" in keys or "w_skip" in keys or cfg.get("affine_connection") or \
            cfg.get("transcode") or _hook_out_differs(cfg):
        raise MechloraError(f"{file} is a transcoder (it maps one site to another: "
                            f"{_describe(tensors)}); mechlora patches residual-stream SAEs")
    if cfg.get("architecture") in ("gated", "jumprelu_transcoder", "transcoder") or \
            {"b_gate", "r_mag", "b_mag"} & keys:
        raise MechloraError(f"{file}: a '{cfg.get('architecture', 'gated')}' SAE is not "
                            "supported; mechlora reads relu, jumprelu and topk SAEs")
    lower = {name.replace("w_", "W_", 1) if name.startswith("w_") else name: t
             for name, t in tensors.items()}
    names = set(lower) - OPTIONAL_KEYS
    if names == MATRIX_KEYS:
        weights, layout = {n: lower[n] for n in MATRIX_KEYS}, _matrix_layout(cfg)
        subtract = bool(cfg.get("apply_b_dec_to_input", layout == "saelens"))
    elif names == SPARSIFY_KEYS:
        weights = {"W_enc": lower["encoder.weight"].T, "b_enc": lower["encoder.bias"],
                   "W_dec": lower["W_dec"], "b_dec": lower["b_dec"]}
        layout, subtract = "sparsify", True
    elif names == LINEAR_KEYS:
        weights = {"W_enc": lower["encoder.weight"].T, "b_enc": lower["encoder.bias"],
                   "W_dec": lower["decoder.weight"].T, "b_dec": lower["decoder.bias"]}
        layout, subtract = "linear", bool(cfg.get("apply_b_dec_to_input", False))
    else:
        raise MechloraError(f"{file} is in no SAE layout mechlora knows: it holds "
                            f"{_describe(tensors)}; expected {LAYOUT_HELP}")
    _check_scaling(file, lower)
    _check_normalisation(file, cfg)
    threshold = lower.get("threshold")
    if threshold is None and "log_threshold" in lower:  # SAELens training checkpoints
        threshold = lower["log_threshold"].exp()
    activation, k = _activation(file, cfg, threshold is not None, k)
    hook = _hook(cfg, file, layout)
    from_config = _layer_of(hook, file) if hook else None
    if layer is not None and from_config is not None and layer != from_config:
        raise MechloraError(f"layer {layer} disagrees with {cfg_file}, which says the SAE "
                            f"reads '{hook}' = resid@{from_config}; drop the layer or pass "
                            f"{from_config}")
    sae = SAE(**weights, activation=activation,
              threshold=threshold if activation == "jumprelu" else None, k=k,
              subtract_b_dec=subtract, layer=from_config if layer is None else layer,
              hook=hook, source=str(file), layout=layout)
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise MechloraError(f"SAE dtype '{name}' is not a floating-point torch dtype; use "
                                "float32, bfloat16 or float16")
    return sae.to(device=device, dtype=dtype)


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        found = [f for f in found if f.name != "sparsity.safetensors"]  # SAELens' side file
        if len(found) != 1:
            raise MechloraError(f"{path} holds {len(found)} .safetensors files "
                                f"({', '.join(f.name for f in found) or 'none'}); give the "
                                "SAE's weights file itself")
        return found[0]
    if not path.is_file():
        raise MechloraError(f"SAE file {path} not found")
    if path.suffix != ".safetensors":
        hint = (f" Gemma Scope 1's params.npz converts without unpickling: {CONVERT_NPZ}"
                if path.suffix == ".npz" else "")
        raise MechloraError(f"{path}: mechlora reads SAEs from .safetensors files only (a "
                            f"pickled or numpy file can run code or hide it).{hint}")
    return path


def _read(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise MechloraError(f"{file} is not a readable safetensors file ({e})") from None


def _config(file: Path) -> tuple[dict, Path | None]:
    for name in CONFIG_NAMES:
        cfg_file = file.parent / name
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise MechloraError(f"{cfg_file} is not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise MechloraError(f"{cfg_file} holds a JSON {type(cfg).__name__}, not an "
                                    "object")
            return cfg, cfg_file
    return {}, None


def _describe(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} {list(t.shape)}" for name, t in sorted(tensors.items()))


def _matrix_layout(cfg: dict) -> str:
    if "hf_hook_point_in" in cfg or cfg.get("architecture") == "jump_relu" or not cfg:
        return "gemma-scope"
    return "saelens"


def _hook_out_differs(cfg: dict) -> bool:
    out = cfg.get("hf_hook_point_out") or cfg.get("hook_name_out")
    return out is not None and out != (cfg.get("hf_hook_point_in") or cfg.get("hook_name"))


def _check_scaling(file: Path, tensors: dict) -> None:
    scale = tensors.get("scaling_factor")
    if scale is None or bool(torch.all(scale == 1)):
        return
    raise MechloraError(f"{file} carries a scaling_factor other than 1 (a fine-tuning scale "
                        "SAELens applies to the features); fold it into W_dec first")


def _check_normalisation(file: Path, cfg: dict) -> None:
    norm = cfg.get("normalize_activations")
    if norm not in (None, False, "none"):
        raise MechloraError(f"{file}: the config asks for input normalisation "
                            f"'{norm}', which needs a scale the file does not carry; fold it "
                            "into the weights first (SAELens: "
                            "sae.fold_activation_norm_scaling_factor)")


def _activation(file: Path, cfg: dict, has_threshold: bool, k: int | None
                ) -> tuple[str, int | None]:
    arch = str(cfg.get("architecture") or cfg.get("activation") or "").lower()
    fn = str(cfg.get("activation_fn") or cfg.get("activation_fn_str") or "").lower()
    cfg_k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if has_threshold or arch in ("jumprelu", "jump_relu"):
        if not has_threshold:
            raise MechloraError(f"{file}: a jumprelu SAE without a threshold tensor")
        if k is not None:
            raise MechloraError(f"{file} is a jumprelu SAE; k applies to topk SAEs only")
        return "jumprelu", None
    if "groupmax" in (arch, fn):
        raise MechloraError(f"{file}: groupmax sparsify SAEs are not supported")
    if k is not None or cfg_k is not None or "topk" in (arch, fn):
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise MechloraError(f"{file}: rescale_acts_by_decoder_norm is not supported; "
                                "fold the decoder norms into W_enc and W_dec first")
        k = k if k is not None else cfg_k
        return "topk", None if k is None else int(k)
    if arch not in ("", "standard", "relu") or fn not in ("", "relu"):
        raise MechloraError(f"{file}: architecture '{arch or fn}' is not supported; mechlora "
                            "reads relu, jumprelu and topk SAEs")
    return "relu", None


def _hook(cfg: dict, file: Path, layout: str) -> str | None:
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for hook in (cfg.get("hf_hook_point_in"), cfg.get("hook_name"), meta.get("hook_name"),
                 cfg.get("hook_point")):
        if hook:
            return str(hook)
    if layout == "sparsify":  # the folder is named after the hookpoint
        return file.parent.name
    return None


def _layer_of(hook: str, file: Path) -> int:
    """The decoder layer whose output the hook is (resid@L)."""
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook):
        return int(m[1])
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook):
        if int(m[1]) == 0:
            raise MechloraError(f"{file} reads {hook}, the embeddings before layer 0; "
                                "mechlora's residual sites are decoder layer outputs")
        return int(m[1]) - 1
    if m := re.fullmatch(r"(?:[\w.]*\.)?layers\.(\d+)(?:\.output)?", hook):
        return int(m[1])
    raise MechloraError(f"{file} reads '{hook}', not the residual stream after a decoder layer "
                        "(blocks.L.hook_resid_post / model.layers.L.output); mechlora attaches "
                        "SAEs at residual sites only")
