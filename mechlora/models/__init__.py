"""Model adapter: presets, loading, and the module map the probes use."""

from mechlora.models.family import FAMILIES, Family, family_of
from mechlora.models.load import load_adapter, load_model, parse_dtype, wrap
from mechlora.models.presets import PRESETS
from mechlora.models.subject import Subject, get_module

__all__ = ["FAMILIES", "PRESETS", "Family", "Subject", "family_of", "get_module", "load_adapter",
           "load_model", "parse_dtype", "wrap"]
