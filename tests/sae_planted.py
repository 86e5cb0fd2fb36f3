"""An SAE planted on the planted model (tests/planted.py): feature F_STAR is the gate.

In `planted_subject(k)` only layer k's attention brings the phrasing to the last position and
layer k's MLP gate turns it into +/- s along the yes-no direction; at resid@k the two
phrasings of a question then differ mostly along one direction u (the gate's write, through
Gemma's post-MLP norm). The SAE built here reads resid@k with

- feature F_STAR: decoder row u, encoder u with bias -c and a JumpReLU threshold halfway to
  phrasing A, so it fires on phrasing A (z = x.u - c) and is 0 on phrasing B, where x.u is
  about c (b_dec = c u): the gate, as an SAE would find it;
- every other feature: +q or -q for a random orthonormal basis q of the rest of the space
  (tied encoder, threshold 0), which reconstructs everything but the u direction exactly.

So the error term is small (x.u - c on phrasing B, 0 elsewhere) and not zero.
"""

from __future__ import annotations

import torch

from mechlora.probes import Site, record
from mechlora.sae import SAE
from tests.planted import planted_groups

F_STAR = 37


def last_resid(subject, layer: int) -> dict[str, list[torch.Tensor]]:
    """resid@layer at the last position of each phrasing ('a' = variant 0, 'b' = variant 1)."""
    out: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    site = Site(layer, "resid")
    with torch.no_grad():
        for g in planted_groups():
            for key, v in zip("ab", g.variants):
                inputs = subject.encode([v.text])
                n = inputs["input_ids"].shape[1]
                with record(subject, [site], torch.tensor([[n - 1]])) as store:
                    subject.model(**inputs)
                out[key].append(store[site][0, 0].float())
    return out


def planted_sae(subject, layer: int, seed: int = 0) -> SAE:
    x = last_resid(subject, layer)
    xa, xb = torch.stack(x["a"]), torch.stack(x["b"])
    d = xa.shape[1]
    u = xa.mean(0) - xb.mean(0)
    u = u / u.norm()
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.cat([u[:, None], torch.randn(d, d - 1, generator=gen)], 1))
    q = basis[:, 1:].T                                   # [d-1, d], orthogonal to u
    c = float((xb @ u).mean())
    gap = float((xa @ u).min()) - c
    assert gap > 2 * float((xb @ u - c).abs().max()), "phrasing A does not stand out along u"
    rows = torch.cat([q, -q])                            # 2(d-1) features
    rows = torch.cat([rows[:F_STAR], u[None], rows[F_STAR:]])
    n = rows.shape[0]
    b_enc, threshold = torch.zeros(n), torch.zeros(n)
    b_enc[F_STAR], threshold[F_STAR] = -c, gap / 2
    return SAE(W_enc=rows.T.contiguous(), b_enc=b_enc, W_dec=rows.clone(), b_dec=c * u,
               activation="jumprelu", threshold=threshold, layer=layer, source="planted")
