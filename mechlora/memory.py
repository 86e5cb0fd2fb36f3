"""How many patched rows fit in one forward: an estimate of the bytes each engine's step holds.

The engines split their rows into forwards whose estimate stays under `max_bytes` (default
4 GiB, docs/memory.md has the arithmetic for MedGemma-4B on a 24 GB card); `max_rows`, when
given, caps the rows as well. Results do not depend on the split (tests/test_localize_memory.py).

The estimate counts what grows with the rows, with the model's own sizes: keys and values
(the cache of every layer holds them until the step ends, and transformers' `DynamicCache`
concatenates the prefix into each), the attention scores of one layer at a time (eager
attention's fp32 softmax: the largest case), one layer's activations per token (hidden-sized
copies, q/k/v and the MLP's intermediate), and the folded engine's masks. Weights, clean runs
and the vision tower are outside it (docs/memory.md counts them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_MAX_BYTES = 4 * 2**30
MIB = 2**20


@dataclass(frozen=True)
class TokenCost:
    """Bytes per token of a language model, from its config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def of(cls, subject) -> TokenCost:
        return cls.from_config(subject.text_config, subject.n_layers,
                               subject.base.get_input_embeddings().weight.dtype)

    @classmethod
    def from_config(cls, cfg, layers: int, dtype) -> TokenCost:
        hidden = cfg.hidden_size
        heads = getattr(cfg, "num_attention_heads", 1)
        return cls(layers=layers, hidden=hidden,
                   intermediate=getattr(cfg, "intermediate_size", None) or 4 * hidden,
                   heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or hidden // heads,
                   dtype_bytes=dtype.itemsize)

    @property
    def kv(self) -> int:
        """Keys and values of one token in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def activations(self) -> int:
        """One layer's working tensors for one token (freed layer by layer)."""
        width = 8 * self.hidden + 3 * self.intermediate + 2 * (self.heads + 2 * self.kv_heads) \
            * self.head_dim
        return width * self.dtype_bytes

    def scores(self, queries: int, keys: int) -> int:
        """One layer's attention scores and their fp32 softmax."""
        return self.heads * queries * keys * (self.dtype_bytes + 4)


def prompt_rows(cost: TokenCost, rows: int, length: int) -> int:
    """`rows` whole prompts of `length` tokens, no cache (batched, nnsight, tlens)."""
    return rows * (length * cost.activations + cost.scores(length, length))


def unfolded_rows(cost: TokenCost, rows: int, prefix: int, k: int) -> int:
    """`rows` continuations of `k` tokens, each over its own copy of a `prefix`-token cache."""
    return rows * ((prefix + k) * cost.kv + k * cost.activations + cost.scores(k, prefix + k))


def folded_rows(cost: TokenCost, rows: int, prefix: int, k: int, masks: int = 2) -> int:
    """`rows` continuations of `k` tokens folded into one sequence over one shared prefix:
    attention and the masks (one per layer kind, plus the boolean temporaries that build
    them) grow with (rows x k)^2."""
    n = rows * k
    return ((prefix + n) * cost.kv + n * cost.activations + cost.scores(n, prefix + n)
            + masks * n * (prefix + n) * (cost.dtype_bytes + 3))


def rows_per_forward(bytes_of: Callable[[int], int], total: int, max_bytes: int | None = None,
                     max_rows: int | None = None) -> int:
    """The most rows (at least one, at most `total` and `max_rows`) whose estimate
    `bytes_of(rows)` fits `max_bytes` (default `DEFAULT_MAX_BYTES`)."""
    budget = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    hi = max(1, min(total, max_rows) if max_rows else total)
    if bytes_of(hi) <= budget:
        return hi
    lo = 1  # bytes_of grows with rows: bisect for the largest row count that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if bytes_of(mid) <= budget else (lo, mid - 1)
    return lo


def chunks(total: int, size: int):
    """(start, stop) of consecutive chunks of `size` rows."""
    for start in range(0, total, max(1, size)):
        yield start, min(total, start + max(1, size))


def table(cost: TokenCost, prompt: int = 310, k_values=(1, 8), rows: int = 1024) -> list[str]:
    """The per-forward estimates docs/memory.md quotes for a `prompt`-token prompt
    (`python -c "import mechlora.memory as m; m.medgemma()"` prints MedGemma-4B's)."""
    def fit(bytes_of) -> int:
        return rows_per_forward(bytes_of, 10**6, DEFAULT_MAX_BYTES)

    lines = [f"{cost.kv:,} bytes of keys+values per token ({prompt * cost.kv / 1e6:.1f} MB "
             f"per {prompt}-token prompt); budget {DEFAULT_MAX_BYTES / 2**30:.0f} GiB",
             f"batched: {prompt_rows(cost, 1, prompt) / MIB:.1f} MiB per whole-prompt row, "
             f"{fit(lambda r: prompt_rows(cost, r, prompt))} rows per forward"]
    for k in k_values:
        def unfolded(r: int, k: int = k) -> int:
            return unfolded_rows(cost, r, prompt - k, k)

        def folded(r: int, k: int = k) -> int:
            return folded_rows(cost, r, prompt - k, k)

        lines += [f"cached unfolded, {k} token(s) per row: {unfolded(1) / MIB:.1f} MiB per "
                  f"row, {fit(unfolded)} rows per forward",
                  f"cached folded, {k} token(s) per row: {rows} rows = "
                  f"{folded(rows) / MIB:,.0f} MiB, {fit(folded)} rows per forward"]
    return lines


def medgemma(prompt: int = 310) -> None:
    """Print `table` for MedGemma-4B in bf16 (from its config; no weights needed)."""
    import torch

    from mechlora.models.presets import medgemma_4b_config

    cfg = medgemma_4b_config().text_config
    print("\n".join(table(TokenCost.from_config(cfg, cfg.num_hidden_layers, torch.bfloat16),
                          prompt)))
