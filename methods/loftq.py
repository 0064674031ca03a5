"""``loftq`` (Li et al. 2023): quantization-aware initialisation of LoRA, own CPU-capable implementation.

Start with ``A = B = 0``. For ``t = 1..T``::

    Q_t   = quant(W − s·B·A)
    U Σ Vᵀ = svd(W − Q_t),  keep the top r triplets
    B = U_r √Σ_r / √s,   A = √Σ_r V_rᵀ / √s        (so that Q_t + s·B·A is the best rank-r correction)

``scale_compensation=False`` drops the ``/√s`` as peft does (its correction is then only ``s`` times the
residual): with one iteration, or with ``s = 1``, that is peft's LoftQ formula for formula
(``tests/test_peft_method.py``); with several iterations and ``s != 1`` peft subtracts ``L·R`` inside the loop
where this subtracts ``s·B·A``, the part the adapter adds. ``variant="peft"`` is peft's loop for any number of
iterations (see :func:`loftq_decompose`), and its stored base is NF4 without double quantization, as peft's.
The base is NF4 through bitsandbytes (bits=4, quant_type='nf', bitsandbytes-compatible), the own
NF2/NF3 codebook quantizer, or INTk (quant_type='int'). The quantizer inside the loop is exactly the one that
stores the base, so ``Q_T`` is what the deployed model dequantizes to.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .adapter import AdapterLinear, PooledAdapter, layer_generator
from .base import ALPHA, DROPOUT, RANK, SEED, TARGETS, Geometry, Hyper, Method
from .errors import ConfigError
from .quant.modules import make_linear
from .quant.scheme import QuantScheme


def loftq_decompose(w: torch.Tensor, scheme: QuantScheme, rank: int, scaling: float, iters: int,
                    scale_compensation: bool = True, variant: str = "suite"):
    """Run LoftQ on one weight. Returns ``(w_to_quantize, A, B, errors)``.

    ``errors[0]`` is ``||W − quant(W)||_F`` (plain quantization, no adapter) and ``errors[t]`` is
    ``||W − (Q_t + s·B_t·A_t)||_F`` after iteration ``t``. The alternation is not monotone in general:
    block-absmax NF and min/max INT quantization are not projections onto a fixed grid, so the error can rise
    slightly after it has converged. The iterate with the smallest error is returned (``w_to_quantize`` is
    ``W − s·B_{t-1}·A_{t-1}`` of that iterate, whose quantization is the base ``Q_t``), so the error of the
    returned initialisation never increases with ``iters``; ``errors`` keeps every iterate's error.

    ``variant="peft"``: peft's ``loftq_init`` step for step (``tests/test_peft_method.py``): the loop quantizes
    ``W − B·A`` (the product without the scaling ``s``) with NF4 *without* double quantization (peft's
    ``Params4bit(compress_statistics=False)``), no scale compensation, and the last iterate is returned."""
    if variant not in ("suite", "peft"):
        raise ConfigError(f"loftq: variant={variant!r}; choose 'suite' or 'peft'.")
    w = w.detach().float()
    d_out, d_in = w.shape
    a = torch.zeros(rank, d_in)
    b = torch.zeros(d_out, rank)
    c = math.sqrt(scaling) if scale_compensation else 1.0
    loop_scheme = QuantScheme(kind="nf", bits=4, blocksize=64) if variant == "peft" else scheme
    loop_scale = 1.0 if variant == "peft" else scaling
    errors = [float((w - scheme.fake_quant(w)).norm())]
    best = None
    for _ in range(iters):
        target = w - loop_scale * (b @ a)
        q = loop_scheme.fake_quant(target)
        u, sig, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = sig[:rank].sqrt()
        b = u[:, :rank] * root / c
        a = root[:, None] * vh[:rank] / c
        errors.append(float((w - (q + scaling * (b @ a))).norm()))
        if best is None or errors[-1] < best[0] or variant == "peft":  # peft keeps the last iterate
            best = (errors[-1], target, a, b)
    _, target, a, b = best
    return target, a, b, errors


class LoftQ(Method):
    name = "loftq"
    label = "LoftQ"
    peft_exportable = True  # a plain LoRA adapter: methods.export_peft_adapter writes it for peft
    plot_style = ("#2ca02c", "^")  # (colour, marker) in the figures
    paper_rows = {"LoftQ": "4+16"}  # published rows it reproduces -> mode
    summary = "LoftQ alternating quantization + SVD init of LoRA (NF4 via bitsandbytes, NF2/NF3, or INTk)"
    deploy = "4+16"
    hyperparameters = {
        "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT,
        "bits": Hyper(4, int, "bits of the base", choices=(2, 3, 4, 8)),
        "quant_type": Hyper("nf", str, "base quantizer: 'nf' (NF4 via bitsandbytes, own NF2/NF3) or 'int'",
                            choices=("nf", "int")),
        "group_size": Hyper(64, int, "block size (nf: absmax block; int: group along the input)", minimum=1),
        "iters": Hyper(5, int, "LoftQ alternating iterations T (the paper uses 5; T=1 is QLoRA + SVD)",
                       minimum=1),
        "scale_compensation": Hyper(True, bool, "divide A and B by sqrt(s) so that s·B·A is the best rank-r "
                                    "correction (False: peft's LoftQ; identical for iters=1 or s=1)"),
        "variant": Hyper("suite", str, "'suite' (the loop subtracts s·B·A, quantizes with the stored base's NF4 + DQ "
                         "and keeps the best iterate) or 'peft' (peft's loftq_init for any iters: W − B·A "
                         "unscaled, NF4 without double quantization in the loop, the last iterate; needs "
                         "scale_compensation=false and the NF4 base)", choices=("suite", "peft")),
        "targets": TARGETS, "seed": SEED,
    }

    def validate(self):
        if self.hp["quant_type"] == "nf" and self.hp["bits"] == 8:
            raise ConfigError("loftq: bits=8 is not available with quant_type='nf' (NF supports 2, 3, 4); "
                              "use quant_type='int' for 8 bits.")
        if self.hp["variant"] == "peft" and (self.hp["scale_compensation"] or self.hp["quant_type"] != "nf"
                                             or self.hp["bits"] != 4):
            raise ConfigError(f"loftq: variant='peft' is peft's LoftQ on NF4 without scale compensation; set "
                              f"scale_compensation: false, bits: 4, quant_type: nf (got scale_compensation="
                              f"{self.hp['scale_compensation']}, bits={self.hp['bits']}, quant_type="
                              f"{self.hp['quant_type']!r}).")
        if self.hp["quant_type"] == "nf" and self.hp["bits"] == 4 and self.hp["group_size"] != 64:
            raise ConfigError(f"loftq: group_size={self.hp['group_size']} is not possible for the bitsandbytes "
                              "NF4 base (block 64); set group_size=64 or quant_type='int'.")
        super().validate()

    def scheme(self):
        bits, g = self.hp["bits"], self.hp["group_size"]
        if self.hp["quant_type"] == "int":
            return QuantScheme(kind="int", bits=bits, group_size=g)
        if bits == 4 and self.hp["variant"] == "peft":
            # peft's base: NF4 block 64 *without* double quantization (loftq_utils.py:77-81; LoftQ's README
            # loads it with bnb_4bit_use_double_quant=False). The suite's own NF4 codebook quantizer holds exactly
            # bitsandbytes' codes and float32 absmax of that format (tests/test_quant.py), so the stored base is
            # the loop's quantizer and the base peft fine-tunes.
            return QuantScheme(kind="nf", bits=4, blocksize=64)
        if bits == 4:
            return QuantScheme(kind="bnb-nf4", bits=4, blocksize=64)
        return QuantScheme(kind="nf", bits=bits, blocksize=g)

    def geometry(self):
        return Geometry(p=1, q=1, rank=self.hp["rank"], init="loftq")

    def base_key(self):
        # LoftQ's base depends on the adapter initialisation: every hyperparameter except dropout counts
        # (variant at its default left out, so that the bases of earlier runs keep their folders)
        return {**super().base_key(), **{k: v for k, v in self.hp.items() if k != "dropout"
                                          and not (k == "variant" and v == "suite")}}

    def quantize_base(self, model, layers, calibration):
        self._init = {}
        self.loftq_report = {}
        self._init_error = {}
        scheme = self.scheme()
        bases = {}
        for name, mod in layers:
            target, a, b, errors = loftq_decompose(mod.weight, scheme, self.hp["rank"], self.scaling,
                                                   self.hp["iters"], self.hp["scale_compensation"],
                                                   self.hp["variant"])
            tmp = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=torch.float32)
            tmp.weight.data.copy_(target)
            if mod.bias is not None:
                tmp.bias.data.copy_(mod.bias.detach().float())
            bases[name] = make_linear(scheme, tmp, compute_dtype=mod.weight.dtype)
            self._init[name] = (a, b)
            self.loftq_report[name] = errors
            # the error the fine-tuning starts from: the returned iterate's (the best, or peft's last)
            start = errors[-1] if self.hp["variant"] == "peft" else min(errors[1:])
            self._init_error[name] = start / max(float(mod.weight.detach().float().norm()), 1e-30)
        return bases

    def init_errors(self, weight_errors):
        """``||W - (Q + s·B·A)|| / ||W||`` of the initialisation LoftQ hands to fine-tuning, per layer (the
        paper's claim: below plain quantization's ``||W - quant(W)|| / ||W||``, QLoRA's starting error)."""
        return getattr(self, "_init_error", None) or weight_errors  # no layers: the base's own (same object)

    def wrap_layer(self, name, base, adapter_dtype):
        adapter = PooledAdapter(base.in_features, base.out_features, p=1, q=1, rank=self.hp["rank"],
                                scaling=self.scaling, dropout=self.hp["dropout"], init="kaiming",
                                dtype=adapter_dtype, generator=layer_generator(self.hp["seed"], name),
                                layer_name=name)
        init = getattr(self, "_init", {})
        if name not in init:
            raise ConfigError(f"loftq: no LoftQ initialisation for layer {name}; quantize the model with this "
                              "method (or load a base saved together with its LoftQ initialisation).")
        a, b = init.pop(name)
        adapter.A.data.copy_(a)
        adapter.B.data.copy_(b)
        return AdapterLinear(base, adapter)
