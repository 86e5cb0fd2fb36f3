"""The sparse autoencoder itself: weights, encode, decode, and the feature patch.

An SAE reads a residual-stream vector x [d_model] and writes feature activations
z = act(x' W_enc + b_enc) [d_sae], where x' = x - b_dec for SAEs trained that way (SAELens
`apply_b_dec_to_input`, EleutherAI sparsify) and x' = x otherwise (Gemma Scope). The
reconstruction is x_hat = z W_dec + b_dec and the error term e = x - x_hat holds whatever
the features miss, so x = x_hat + e always.

Every intervention here keeps the error term: changing features F of x by dz moves x by
dz[F] W_dec[F] and leaves the rest of x (including e) as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechlora.errors import MechloraError

ACTIVATIONS = ("relu", "jumprelu", "topk")


@dataclass
class SAE:
    """A sparse autoencoder over one residual site (resid@layer: decoder layer `layer`'s output).

    `activation`: `relu` (max(0, pre)), `jumprelu` (pre where pre > threshold, else 0; Gemma
    Scope) or `topk` (the k largest of relu(pre), the rest 0). `layer`, `hook`: where the
    SAE's own config says it reads (None when the file says nothing).
    """

    W_enc: torch.Tensor                      # [d_model, d_sae]
    b_enc: torch.Tensor                      # [d_sae]
    W_dec: torch.Tensor                      # [d_sae, d_model]
    b_dec: torch.Tensor                      # [d_model]
    activation: str = "relu"
    threshold: torch.Tensor | None = None    # [d_sae], jumprelu
    k: int | None = None                     # topk
    subtract_b_dec: bool = False             # encode x - b_dec instead of x
    layer: int | None = None
    hook: str | None = None
    source: str = ""
    layout: str = "python"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise MechloraError(f"SAE activation '{self.activation}' is not one of "
                                f"{', '.join(ACTIVATIONS)}")
        d, n = self.W_enc.shape if self.W_enc.ndim == 2 else (None, None)
        expect = {"W_enc": (d, n), "W_dec": (n, d), "b_enc": (n,), "b_dec": (d,)}
        if self.activation == "jumprelu":
            if self.threshold is None:
                raise MechloraError("a jumprelu SAE needs a threshold [d_sae]")
            expect["threshold"] = (n,)
        got = {name: tuple(getattr(self, name).shape) for name in expect}
        if d is None or any(got[name] != shape for name, shape in expect.items()):
            raise MechloraError(
                f"SAE {self.source or ''} has inconsistent shapes: "
                + ", ".join(f"{k} {list(v)}" for k, v in got.items())
                + "; expected W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc [d_sae], "
                "b_dec [d_model]" + (", threshold [d_sae]" if "threshold" in expect else ""))
        if self.activation == "topk" and not (self.k and 0 < self.k <= n):
            raise MechloraError(f"a topk SAE needs k between 1 and d_sae={n}, got {self.k}; "
                                "pass k (--k) or put it in the config beside the file")

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> SAE:
        """Move (and cast) every weight in place; returns self."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device=device, dtype=dtype))
        return self

    def pre(self, x: torch.Tensor, features=None) -> torch.Tensor:
        """Pre-activations [..., d_sae] of residual vectors x [..., d_model] (only the columns
        `features`, an index or index tensor, when given), in the SAE's dtype and device."""
        x = x.to(self.device, self.dtype)
        if self.subtract_b_dec:
            x = x - self.b_dec
        if features is None:
            return x @ self.W_enc + self.b_enc
        return x @ self.W_enc[:, features] + self.b_enc[features]

    def encode(self, x: torch.Tensor, features=None) -> torch.Tensor:
        """Feature activations z [..., d_sae], or only the columns `features` (computed on
        their own, except for topk, whose selection needs every feature)."""
        if self.activation == "topk":
            pre = self.pre(x).clamp_min(0)
            top = pre.topk(self.k, dim=-1)
            z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
            return z if features is None else z[..., features]
        pre = self.pre(x, features)
        z = pre.clamp_min(0)
        if self.activation == "jumprelu":
            z = z * (pre > (self.threshold if features is None else self.threshold[features]))
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat = z W_dec + b_dec [..., d_model]."""
        return z.to(self.device, self.dtype) @ self.W_dec + self.b_dec

    def error(self, x: torch.Tensor) -> torch.Tensor:
        """The error term e = x - decode(encode(x)): what the features do not explain."""
        return x.to(self.device, self.dtype) - self.decode(self.encode(x))

    def shift(self, dz: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """The residual change [..., d_model] that moves `features` by dz [..., len(features)]
        (all features when None): dz W_dec[features]. No b_dec, no error term: both stay."""
        dz = dz.to(self.device, self.dtype)
        if features is None:
            return dz @ self.W_dec
        return dz @ self.W_dec[features.to(self.device)]

    def describe(self) -> dict:
        """What the JSON outputs record about this SAE."""
        return {"source": self.source, "layout": self.layout, "activation": self.activation,
                "k": self.k, "d_model": self.d_model, "d_sae": self.d_sae,
                "subtract_b_dec": self.subtract_b_dec, "hook": self.hook, "layer": self.layer,
                "dtype": str(self.dtype).removeprefix("torch.")}


def patched_resid(sae: SAE, x_b: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor,
                  features: torch.Tensor | None) -> torch.Tensor:
    """The recipient's residual with `features` taken from the donor, the rest kept:
    x' = x_b + sum_{f in F} (z_a[f] - z_b[f]) W_dec[f], in x_b's dtype and device.

    With no feature the result is x_b itself (bit for bit): the error term and every other
    feature stay. `features=None` moves every feature (x_b + x_hat_a - x_hat_b).
    """
    if features is not None and len(features) == 0:
        return x_b.clone()
    dz = z_a - z_b if features is None else (z_a - z_b)[..., features.to(z_a.device)]
    delta = sae.shift(dz, features).to(x_b.device, torch.float32)
    return (x_b.float() + delta).to(x_b.dtype)


def attach_layer(sae: SAE, subject, layer: int | None) -> int:
    """The decoder layer whose output (resid@layer) the SAE reads, checked against the model:
    the SAE's own config and `layer` must agree, the layer must exist, and the SAE's d_model
    must be the model's hidden size."""
    if layer is None and sae.layer is None:
        raise MechloraError(f"the SAE {sae.source or ''} does not say which layer it reads (no "
                            "hook in a config beside the file); pass the layer (--layer L): "
                            "mechlora attaches it to the output of decoder layer L (resid@L)")
    if layer is not None and sae.layer is not None and layer != sae.layer:
        raise MechloraError(f"--layer {layer} disagrees with the SAE's config, which reads "
                            f"'{sae.hook}' = resid@{sae.layer}; pass --layer {sae.layer} or "
                            "drop --layer")
    layer = sae.layer if layer is None else layer
    n = subject.n_layers
    if not 0 <= layer < n:
        raise MechloraError(f"layer {layer} does not exist: {subject.name} has {n} decoder "
                            f"layers (0-{n - 1})")
    hidden = getattr(subject.text_config, "hidden_size", None)
    if hidden is not None and hidden != sae.d_model:
        raise MechloraError(f"the SAE {sae.source or ''} reads {sae.d_model}-dimensional "
                            f"vectors but {subject.name}'s residual stream has {hidden} "
                            "dimensions: it was trained for another model")
    return layer
