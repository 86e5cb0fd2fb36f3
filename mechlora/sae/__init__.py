"""Sparse-autoencoder features at a residual site: load, rank, patch, clamp (docs/sae.md).

    from mechlora.sae import load_sae, rank_features, patch_features, clamp_eval
    sae = load_sae("resid_post_all/layer_17_width_16k_l0_small/params.safetensors")
    ranking = rank_features(subject, sae, "pairs.jsonl")             # layer from its config
    patched = patch_features(subject, sae, "pairs.jsonl", ranking.features(5))
    clamped = clamp_eval(subject, sae, ranking.features(1)[0], "mean:0", "pairs.jsonl")
"""

from mechlora.sae.analysis import patch_features, rank_features
from mechlora.sae.clamp import clamp_eval, clamp_feature, feature_values, resolve_value
from mechlora.sae.load import load_sae
from mechlora.sae.model import SAE, attach_layer, patched_resid
from mechlora.sae.result import ClampResult, FeaturePatchResult, FeatureRanking

__all__ = [
    "SAE", "ClampResult", "FeaturePatchResult", "FeatureRanking", "attach_layer", "clamp_eval",
    "clamp_feature", "feature_values", "load_sae", "patch_features", "patched_resid",
    "rank_features", "resolve_value",
]
