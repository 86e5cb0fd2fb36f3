import pytest
import torch

from mechlora.models import wrap
from mechlora.models.presets import tiny_gemma3_text, tiny_gemma3_vlm

torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture(scope="session")
def tiny_vlm():
    model, processor = tiny_gemma3_vlm(seed=0, n_layers=6)
    return wrap(model, processor, name="tiny-vlm-6")


@pytest.fixture(scope="session")
def tiny_text():
    model, tok = tiny_gemma3_text(seed=0, n_layers=6)
    return wrap(model, tok, name="tiny-text-6")
