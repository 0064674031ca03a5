"""The pooled-adapter family that covers every method (METHODS.md, "One adapter family covers every method").

    Δy = s · Rep_q( M · dropout(Pool_p(x)) )          M = B·A (rank ρ)  or  M = H (one full matrix)

* ``Pool_p``: mean (or sum, QA-LoRA's paper reading) over consecutive, non-overlapping groups of ``p`` input
  features (``AvgPool1d(p)``); pooling comes before dropout, as in the reference codes.
* ``Rep_q``: each output element repeated ``q`` times consecutively (``repeat_interleave``, not tiling).
* ``A: (ρ, D_in/p)``, ``B: (D_out/q, ρ)``, ``H: (D_out/q, D_in/p)``.
* The equivalent dense update is ``ΔW[o, i] = s · c · M[o // q, i // p]`` with ``c = 1/p`` for mean pooling
  and ``c = 1`` for sum pooling: constant on every ``q x p`` block, which is what makes the exact merge into
  zero points possible.

:class:`PooledAdapter` holds the trainable matrices; :class:`AdapterLinear` wraps any frozen base linear
(``nn.Linear``, bitsandbytes ``Linear4bit``, :class:`methods.quant.linear.QuantLinear`) and adds ``Δy``.
"""
from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, ShapeError

INITS_LOWRANK = ("kaiming", "xavier", "gaussian")
INITS_FULL = ("zeros", "kaiming")
POOLS = ("mean", "sum")


def layer_generator(seed: int, layer_name: str) -> torch.Generator:
    """A generator seeded from (seed, layer name): initialisation does not depend on layer order."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(layer_name.encode())) % (2**63))


class PooledAdapter(nn.Module):
    """``Δy = s · Rep_q(M · dropout(Pool_p(x)))`` with ``M = B·A`` (``rank`` given) or ``M = H`` (``rank=None``)."""

    def __init__(self, in_features: int, out_features: int, *, p: int = 1, q: int = 1, rank: int | None,
                 scaling: float, dropout: float = 0.0, init: str = "kaiming", pool: str = "mean",
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
                 layer_name: str = "layer"):
        super().__init__()
        if in_features % p or out_features % q:
            raise ShapeError(
                f"layer {layer_name} with weight shape (out={out_features}, in={in_features}) is incompatible "
                f"with the adapter's pooling p={p} / repeat q={q}: "
                + (f"in={in_features} is not divisible by p={p}. " if in_features % p else "")
                + (f"out={out_features} is not divisible by q={q}. " if out_features % q else "")
                + "Choose p (group_size / k) and q dividing the layer's widths, or exclude the layer via targets."
            )
        if pool not in POOLS:
            raise ConfigError(f"pool={pool!r} is not one of {list(POOLS)}")
        self.in_features, self.out_features = in_features, out_features
        self.p, self.q, self.rank, self.pool = p, q, rank, pool
        self.scaling = float(scaling)
        self.init = init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        n_in, n_out = in_features // p, out_features // q
        if rank is None:
            if init not in INITS_FULL:
                raise ConfigError(f"init={init!r} is not valid for a full-matrix adapter; choose one of {list(INITS_FULL)}")
            self.H = nn.Parameter(torch.zeros(n_out, n_in, dtype=dtype))
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.H, a=math.sqrt(5), generator=generator)
        else:
            if init not in INITS_LOWRANK:
                raise ConfigError(f"init={init!r} is not valid for a low-rank adapter; choose one of {list(INITS_LOWRANK)}")
            self.A = nn.Parameter(torch.zeros(rank, n_in, dtype=dtype))
            self.B = nn.Parameter(torch.zeros(n_out, rank, dtype=dtype))
            if init == "kaiming":  # nn.Linear's default, as in peft
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
            elif init == "xavier":  # QA-LoRA's official code
                nn.init.xavier_uniform_(self.A, generator=generator)
            else:  # peft's "gaussian"
                nn.init.normal_(self.A, std=1.0 / rank, generator=generator)

    @property
    def full(self) -> bool:
        return self.rank is None

    @property
    def pool_factor(self) -> float:
        """``c`` in ``ΔW = s · c · M[o//q, i//p]``: ``1/p`` for mean pooling, 1 for sum pooling."""
        return 1.0 / self.p if self.pool == "mean" else 1.0

    def matrix(self) -> torch.Tensor:
        """``M`` of shape ``(D_out/q, D_in/p)`` in float32."""
        return self.H.float() if self.full else self.B.float() @ self.A.float()

    @torch.no_grad()
    def block_delta(self) -> torch.Tensor:
        """The update's value on each ``q x p`` block, shape ``(D_out/q, D_in/p)``, float32."""
        return self.scaling * self.pool_factor * self.matrix()

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The equivalent dense update ``ΔW`` of shape ``(D_out, D_in)``, float32."""
        return self.block_delta().repeat_interleave(self.q, dim=0).repeat_interleave(self.p, dim=1)

    def pool_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 1:
            return x
        u = x.unflatten(-1, (self.in_features // self.p, self.p))
        return u.mean(-1) if self.pool == "mean" else u.sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        param = self.H if self.full else self.A
        u = self.dropout(self.pool_input(x.to(param.dtype)))
        v = F.linear(u, self.H) if self.full else F.linear(F.linear(u, self.A), self.B)
        if self.q > 1:
            v = v.repeat_interleave(self.q, dim=-1)
        return (v * self.scaling).to(x.dtype)

    def extra_repr(self) -> str:
        m = "H" if self.full else f"B·A rank={self.rank}"
        return (f"in={self.in_features}, out={self.out_features}, p={self.p}, q={self.q}, M={m}, "
                f"s={self.scaling:g}, pool={self.pool}, init={self.init}")


class AdapterLinear(nn.Module):
    """A frozen base linear plus a :class:`PooledAdapter`: ``y = base(x) + Δy``."""

    def __init__(self, base: nn.Module, adapter: PooledAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.disabled = False

    @property
    def in_features(self) -> int:
        return self.adapter.in_features

    @property
    def out_features(self) -> int:
        return self.adapter.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            return y
        return y + self.adapter(x).to(y.dtype)


@contextlib.contextmanager
def disabled_adapters(model: nn.Module):
    """Context manager: run the model as its frozen base (adapters and PEQA scale deltas off)."""
    mods = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    scaled = [m for m in model.modules() if getattr(m, "scale_delta", None) is not None]
    old = [m.disabled for m in mods]
    old_s = [getattr(m, "scale_delta_disabled", False) for m in scaled]
    try:
        for m in mods:
            m.disabled = True
        for m in scaled:
            m.scale_delta_disabled = True
        yield model
    finally:
        for m, o in zip(mods, old):
            m.disabled = o
        for m, o in zip(scaled, old_s):
            m.scale_delta_disabled = o
