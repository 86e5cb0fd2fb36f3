"""Loading models: built-in presets, HF hub ids, local folders, and already loaded models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mechlora.errors import MechloraError
from mechlora.models.presets import PRESETS
from mechlora.models.subject import Subject

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise MechloraError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str, *, dtype: str | torch.dtype | None = None,
               device: str | None = None, trust_remote_code: bool = False,
               layers_path: str | None = None, adapter: str | None = None,
               template: str | None = None) -> Subject:
    """A `Subject` for a built-in preset, a local model folder, or a hub id.

    Presets: tiny-gemma3-vlm, tiny-gemma3-text, medgemma-4b (meta device), organism. Hub ids
    load from the local cache when offline; a missing model gets a clear error. `adapter`
    applies a PEFT adapter folder on top. `template` (with "{question}") prompts a model that
    has no chat template; the tokenizer's BOS is put in front of it when the tokenizer would
    add one.
    """
    device = device or default_device()
    torch_dtype = parse_dtype(dtype)
    if name_or_path in PRESETS:
        model, processor = PRESETS[name_or_path]()
        if name_or_path != "medgemma-4b":
            model = model.to(device=device, dtype=torch_dtype or torch.float32)
    else:
        model, processor = _from_pretrained(name_or_path, torch_dtype, device, trust_remote_code)
    model.eval()
    if adapter is not None:
        model = load_adapter(model, adapter)
    kw = {"template": template} if template else {}
    return Subject(model, processor, name=name_or_path, layers_path=layers_path, **kw)


def _from_pretrained(name: str, dtype, device: str, trust_remote_code: bool):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    kw: dict[str, Any] = dict(trust_remote_code=trust_remote_code)
    path = Path(name)
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise MechloraError(f"model folder {name} does not exist")
    try:
        config = AutoConfig.from_pretrained(name, **kw)
    except OSError as e:
        raise MechloraError(
            f"cannot load model '{name}': not a built-in preset ({', '.join(PRESETS)}), not a "
            "local folder with config.json, and not in the local hub cache (no network?). "
            f"Details: {str(e).splitlines()[0]}") from None
    is_vlm = hasattr(config, "vision_config")
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = auto.from_pretrained(name, dtype=dtype or "auto", **kw).to(device)
    try:
        processor = (AutoProcessor if is_vlm else AutoTokenizer).from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        raise MechloraError(f"model '{name}' has no usable tokenizer/processor: {e}") from None
    return model, processor


def load_adapter(model: nn.Module, adapter: str | Path, name: str | None = None) -> nn.Module:
    """Apply a PEFT adapter folder (any PEFT LoRA, not only mechlora's)."""
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise MechloraError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=name or path.name)
        return model
    return PeftModel.from_pretrained(model, str(path), adapter_name=name or "default").eval()


def wrap(model: nn.Module, processor: Any, *, name: str | None = None,
         layers_path: str | None = None, template: str | None = None) -> Subject:
    """A `Subject` for a model you already loaded (HF `PreTrainedModel` or a PEFT model)."""
    if isinstance(model, Subject):
        return model
    from mechlora.bridges import is_bridge

    if is_bridge(model):  # a TransformerLens TransformerBridge
        from mechlora.bridges.tlens import subject_from_bridge

        return subject_from_bridge(model, processor)
    kw = {"template": template} if template else {}
    cfg = getattr(model, "config", None)
    return Subject(model, processor, name=name or getattr(cfg, "_name_or_path", "") or "model",
                   layers_path=layers_path, **kw)
