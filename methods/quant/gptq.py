"""GPTQ for the group-wise asymmetric INTk quantizer of :mod:`methods.quant.intk` (METHODS.md, "Quantizers").

What is computed
----------------
For one linear layer ``y = x Wᵀ`` with weight ``W (D_out, D_in)`` and the calibration Hessian
``H = 2/N · Σ_n x_n x_nᵀ`` (``D_in x D_in``, float32, :class:`HessianAccumulator`), GPTQ (Frantar et al. 2022,
arXiv 2210.17323, code IST-DASLab/gptq) quantizes the input columns left to right and, after each column,
spreads that column's quantization error over the not yet quantized columns so that the layer output on the
calibration inputs changes as little as possible:

1. Dead inputs: every column ``i`` with ``H[i, i] == 0`` (an input that is always 0 on the calibration data)
   gets ``H[i, i] = 1``. With ``dead="zero"`` (default, as IST-DASLab/GPTQModel) its weights are set to 0
   before quantization; with ``dead="keep"`` they are kept (and so quantized like RTN: a dead input's row and
   column of ``H`` are 0, so its error is never propagated and it receives none).
2. Damping: ``H += damp · mean(diag H) · I`` (``damp=0.01``, the GPTQ paper's "percdamp"). If a Cholesky
   factorisation still fails, ``damp`` is multiplied by 10 (up to 3 times, with a warning), then
   :class:`~methods.errors.ConfigError` is raised.
3. ``U = chol(H⁻¹)ᵀ`` (upper Cholesky factor of the inverse Hessian: ``cholesky`` → ``cholesky_inverse`` →
   ``cholesky(upper=True)``). Row ``i`` of ``U`` divided by ``U[i, i]`` is the optimal update of the remaining
   columns for an error in column ``i`` (the OBS update restricted to the columns ``>= i``).
4. Columns are processed in their natural order (act-order / ``desc_act`` is OFF) in batches of ``block_size``
   columns ("lazy batch updates"): inside a batch each column ``c`` is quantized, ``err = (w_c - q_c) / U[c, c]``
   and the remaining columns of the batch are updated by ``-err ⊗ U[c, c+1:i2]``; the columns after the batch
   are updated once per batch by ``-Err · U[i1:i2, i2:]``. This is the same arithmetic as updating after
   every column, only reordered.
5. Quantization grid: the layer is split into the blocks of :mod:`~methods.quant.intk` — row groups
   ``(1, g)`` or 2-D tiles ``(tile_out, tile_in)`` such as ``(8, 4)``. When the first column ``c`` of a block
   column (``c % tile_in == 0``) is reached, the scale and zero of every block in the columns
   ``c .. c+tile_in-1`` are computed from the *current, error-updated* weights of those columns (all updates
   from the columns ``< c`` applied, including the pending updates of the current lazy batch), for all
   ``D_out / tile_out`` tiles of ``tile_out`` rows at once. The parameters are then frozen for that block.
   Scale, zero and code formulas are exactly those of ``intk``::

       scale = (max - min) / (2^k - 1)  (1 where max == min)      zero = -min / scale   (a float)
       q     = clamp(round(w / scale + zero), 0, 2^k - 1)         w~   = scale · (q - zero)

   so that ``int_dequantize(codes, scale, zero, tile)`` reproduces the GPTQ weights bit for bit.

Where this differs from the original GPTQ (IST-DASLab ``Quantizer``; GPTQModel 7.x is identical there)
-------------------------------------------------------------------------------------------------------
* **Float zero points** (``zero = -min/scale``, codes ``round(w/scale + zero)``) instead of integer ones
  (``zero = round(-min/scale)``, codes ``round(w/scale) + zero``): needed for the exact zero-point merges of
  QA-LoRA / QA-HiRA. Exporting to a GPTQ checkpoint must round them (:mod:`methods.quant.export` measures
  that loss).
* **min/max are not extended to include 0** (the original uses ``min(xmin, 0)``, ``max(xmax, 0)``, so that 0 is
  on the grid); here the grid spans exactly ``[min, max]`` of the block, as RTN in ``intk`` does. An all-equal
  block gets ``scale = 1`` (the original uses the range ``[-1, 1]`` for an all-zero block).
* **2-D tiles**: the original only knows row groups ``(1, g)`` (or per-channel); here a tile of ``tile_out``
  rows shares one scale/zero, computed from all ``tile_out · tile_in`` current weights.
* **Group parameters from the fully updated weights** (``group_params="updated"``, default): the original
  code computes a group's parameters from ``W[:, c:c+g]``, which inside a lazy batch still misses the updates
  of the columns ``i1..c-1`` of the same batch (they live in the batch copy ``W1``). So for ``g < block_size``
  the 2nd, 3rd ... group of each batch gets its min/max from partially updated weights. ``"reference"``
  reproduces that behaviour exactly (used for the GPTQModel parity check); with ``block_size == g`` both are
  identical.
* ``quantizer="gptq_reference"`` (only for parity checks) switches to the original integer-zero quantizer
  (min/max extended to 0, ``zero = round(-min/scale)``, ``q = clamp(round(w/scale) + zero)``); the returned
  zeros are then integer-valued floats.
* The damping retry (×10) differs from GPTQModel's additive ``damp_auto_increment``; it only matters for
  singular Hessians.

The Hessian is scaled by ``2/N`` with ``N`` the number of *tokens* (GPTQModel; the IST-DASLab code counts
sequences). The scale of ``H`` does not change the result (the damping is relative to ``mean(diag H)``).

Model level: :func:`gptq_quantize_model` quantizes a transformers decoder block by block ("sequential"),
feeding each block the outputs of the already quantized previous blocks, and inside a block
"true-sequential" (q/k/v, then o, then gate/up, then down, recomputing the inputs of later sub-layers with the
earlier sub-layers already quantized), as GPTQ/GPTQModel with ``true_sequential=True``.
"""
from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, ShapeError, did_you_mean
from .intk import check_bits, check_tile, int_params

__all__ = [
    "gptq_quantize_weight",
    "HessianAccumulator",
    "gptq_quantize_model",
    "calibration_from_texts",
    "DEFAULT_SEQUENTIAL_STAGES",
]

GROUP_PARAMS = ("updated", "reference")
QUANTIZERS = ("intk", "gptq_reference")
DEAD = ("zero", "keep")


# --------------------------------------------------------------------------------------------- Hessian


class HessianAccumulator:
    """Running ``H = 2/N · Σ xᵀx`` (float32) of the inputs of one linear layer.

    ``N`` counts tokens (rows of the flattened input). Use :meth:`add_batch` directly, or
    :meth:`attach` to register a forward hook on a module (the hook reads ``inputs[0]``)::

        acc = HessianAccumulator(layer.in_features)
        handle = acc.attach(layer)
        ...  # forward passes
        handle.remove()
        acc.H
    """

    def __init__(self, d_in: int, device: torch.device | str | None = None):
        self.d_in = int(d_in)
        self.H = torch.zeros(self.d_in, self.d_in, dtype=torch.float32, device=device)
        self.n_samples = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ShapeError(
                f"HessianAccumulator for in_features={self.d_in} got an input with last dimension "
                f"{x.shape[-1]}; attach it to the layer whose input it should collect."
            )
        x = x.detach().reshape(-1, self.d_in).to(device=self.H.device, dtype=torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        total = self.n_samples + n
        self.H.mul_(self.n_samples / total)
        x = x * math.sqrt(2.0 / total)
        self.H.addmm_(x.t(), x)
        self.n_samples = total

    def hook(self, module: nn.Module, inputs: tuple, output) -> None:  # forward-hook signature
        self.add_batch(inputs[0])

    def attach(self, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        return module.register_forward_hook(self.hook)


# ------------------------------------------------------------------------------------- one layer


def _inverse_hessian_factor(H: torch.Tensor, damp: float, max_retries: int = 3) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹``, raising ``damp`` ×10 on failure."""
    mean_diag = torch.mean(torch.diagonal(H))
    d = float(damp)
    for attempt in range(max_retries + 1):
        Hd = H.clone()
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                if attempt:
                    warnings.warn(f"GPTQ: Hessian not positive definite with damp={damp}; used damp={d}.")
                return U
        d *= 10.0
    raise ConfigError(
        f"GPTQ: the Hessian is not positive definite even with damp={d / 10:g} "
        f"(started at damp={damp}); use more / longer calibration samples or a larger damp."
    )


def _block_params(wcols: torch.Tensor, bits: int, tile_out: int, quantizer: str):
    """Scale and zero (each ``(D_out/tile_out,)``) of the blocks that span the columns ``wcols (D_out, ti)``."""
    if quantizer == "intk":
        scale, zero = int_params(wcols, bits, (tile_out, wcols.shape[1]))
        return scale[:, 0], zero[:, 0]
    # the original GPTQ quantizer: range extended to contain 0, integer zero point
    maxq = 2**bits - 1
    b = wcols.reshape(wcols.shape[0] // tile_out, -1)
    xmin = torch.clamp(b.amin(dim=1), max=0.0)
    xmax = torch.clamp(b.amax(dim=1), min=0.0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both0, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale, zero


@torch.no_grad()
def gptq_quantize_weight(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    tile: tuple[int, int],
    damp: float = 0.01,
    block_size: int = 128,
    *,
    group_params: str = "updated",
    dead: str = "zero",
    quantizer: str = "intk",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-quantize one weight matrix (see the module docstring for the exact algorithm).

    Args:
        w: weight ``(D_out, D_in)`` (any float dtype; computed in float32).
        H: Hessian ``(D_in, D_in)`` of the layer inputs (e.g. :class:`HessianAccumulator`.H); not modified.
        bits: 2, 3, 4 or 8.
        tile: quantization block ``(tile_out, tile_in)``; ``(1, g)`` are the usual row groups.
        damp: relative dampening of the Hessian diagonal.
        block_size: columns per lazy batch update (changes only the float rounding, not the algorithm).
        group_params: ``"updated"`` (default) or ``"reference"`` (original-code behaviour, see module doc).
        dead: ``"zero"`` (default, original) or ``"keep"``: what happens to the weights of dead inputs.
        quantizer: ``"intk"`` (default, float zeros) or ``"gptq_reference"`` (only for parity checks).

    Returns:
        ``(codes uint8 (D_out, D_in), scale (D_out/tile_out, D_in/tile_in), zero (same))`` in the
        ``intk`` layout: ``int_dequantize(codes, scale, zero, tile)`` gives the quantized weights.
    """
    check_bits(bits)
    if w.dim() != 2:
        raise ShapeError(f"gptq_quantize_weight: w must be 2-D (D_out, D_in), got shape {tuple(w.shape)}.")
    d_out, d_in = w.shape
    tile = (int(tile[0]), int(tile[1]))
    check_tile((d_out, d_in), tile)
    if tuple(H.shape) != (d_in, d_in):
        raise ShapeError(
            f"gptq_quantize_weight: H has shape {tuple(H.shape)}, expected ({d_in}, {d_in}) for a weight of "
            f"shape {tuple(w.shape)}; collect H from this layer's inputs."
        )
    for name, value, allowed in (("group_params", group_params, GROUP_PARAMS), ("dead", dead, DEAD),
                                 ("quantizer", quantizer, QUANTIZERS)):
        if value not in allowed:
            raise ConfigError(f"gptq_quantize_weight: {name}={value!r} is not one of {list(allowed)}.")
    if not (damp > 0):
        raise ConfigError(f"gptq_quantize_weight: damp={damp!r} must be > 0 (GPTQ uses 0.01).")
    if block_size < 1:
        raise ConfigError(f"gptq_quantize_weight: block_size={block_size!r} must be >= 1 (GPTQ uses 128).")

    to, ti = tile
    maxq = 2**bits - 1
    W = w.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    if not torch.isfinite(H).all():
        raise ConfigError("gptq_quantize_weight: the Hessian contains NaN/inf; check the calibration forward pass.")

    is_dead = torch.diagonal(H) == 0
    if is_dead.any():
        H[is_dead, is_dead] = 1.0
        if dead == "zero":
            W[:, is_dead] = 0.0
    U = _inverse_hessian_factor(H, damp)
    del H

    codes = torch.empty(d_out, d_in, dtype=torch.uint8, device=W.device)
    scales = torch.empty(d_out // to, d_in // ti, dtype=torch.float32, device=W.device)
    zeros = torch.empty_like(scales)
    s_col = z_col = None

    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if c % ti == 0:
                end = c + ti
                if group_params == "reference":
                    cur = W[:, c:end]
                elif end <= i2:
                    cur = W1[:, i:i + ti]
                else:  # block column crosses the batch end: apply this batch's pending updates
                    beyond = W[:, i2:end] - Err1[:, :i] @ U[i1:c, i2:end]
                    cur = torch.cat([W1[:, i:], beyond], dim=1)
                s, z = _block_params(cur, bits, to, quantizer)
                scales[:, c // ti] = s
                zeros[:, c // ti] = z
                s_col = s.repeat_interleave(to)
                z_col = z.repeat_interleave(to)
            col = W1[:, i]
            if quantizer == "intk":
                q = torch.clamp(torch.round(col / s_col + z_col), 0, maxq)
            else:
                q = torch.clamp(torch.round(col / s_col) + z_col, 0, maxq)
            codes[:, c] = q.to(torch.uint8)
            err = (col - s_col * (q - z_col)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return codes, scales, zeros


# ------------------------------------------------------------------------------------- model level

#: true-sequential stages (regexes on the sub-module name inside one decoder block), in order
DEFAULT_SEQUENTIAL_STAGES: tuple[str, ...] = (
    r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj|query|key|value)$",
    r"(^|\.)(o_proj|out_proj)$",
    r"(^|\.)(gate_proj|up_proj|gate_up_proj|w1|w3)$",
    r"(^|\.)(down_proj|w2)$",
)


class _StopForward(Exception):
    pass


def _find_decoder_layers(model: nn.Module, target_names: Sequence[str]) -> tuple[str, nn.ModuleList]:
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        prefix = f"{name}." if name else ""
        hits = sum(1 for t in target_names if t.startswith(prefix) and t[len(prefix):].split(".")[0].isdigit())
        if hits and (best is None or hits > best[0]):
            best = (hits, name, mod)
    if best is None or best[0] != len(target_names):
        outside = [t for t in target_names if best is None or not t.startswith(f"{best[1]}.")]
        raise ConfigError(
            f"gptq_quantize_model: the targets {outside[:5]} are not inside the model's decoder blocks "
            f"(an nn.ModuleList of layers); GPTQ here only quantizes projections of decoder blocks "
            f"(not lm_head / embeddings)."
        )
    return best[1], best[2]


def _module_device(module: nn.Module) -> torch.device | None:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return None


def _to_device(x, device: torch.device | None):
    """``x`` (a tensor, or tuples / lists / dicts of them) on ``device``; everything else unchanged."""
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x if x.device == device else x.to(device)
    if isinstance(x, tuple):
        return tuple(_to_device(v, device) for v in x)
    if isinstance(x, list):
        return [_to_device(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _scheme_bits_tile(scheme) -> tuple[int, tuple[int, int]]:
    kind = getattr(scheme, "kind", "int")
    if kind != "int":
        raise ConfigError(f"gptq_quantize_model: scheme.kind={kind!r}; GPTQ here supports only kind='int'.")
    bits = int(scheme.bits)
    tile = tuple(int(t) for t in scheme.block())
    return bits, tile


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    target_names: list[str],
    scheme,
    calibration: list[torch.LongTensor],
    *,
    true_sequential: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    stages: Sequence[str] = DEFAULT_SEQUENTIAL_STAGES,
    group_params: str = "updated",
    dead: str = "zero",
) -> dict:
    """Quantize the named ``nn.Linear`` modules of a transformers decoder model with GPTQ, in place.

    Decoder block by block: the inputs of block 0 are captured from the embedding output (a pre-hook stops the
    forward pass there), each block is quantized and then run again to give the (already quantized) inputs of
    the next block. With ``true_sequential`` the targets of a block are quantized in the stages of ``stages``
    (default: q/k/v → o → gate/up → down), re-running the block before each stage so that the Hessians of later
    stages see the outputs of the already quantized earlier ones; otherwise all Hessians of a block come from
    one pass through the unquantized block. Each target is replaced by
    ``QuantLinear.from_quantized(codes, scheme, scales=..., zeros=..., bias=...)``.

    Args:
        calibration: token-id tensors, ``(seq_len,)`` or ``(1, seq_len)`` each (see
            :func:`calibration_from_texts`); run one at a time (lengths may differ).

    Returns:
        ``{name: QuantLinear}`` for every target, in ``target_names`` order.
    """
    from .linear import QuantLinear  # written concurrently; imported lazily

    bits, tile = _scheme_bits_tile(scheme)
    target_names = list(dict.fromkeys(target_names))
    if not target_names:
        raise ConfigError("gptq_quantize_model: target_names is empty; name the nn.Linear modules to quantize.")
    if not calibration:
        raise ConfigError("gptq_quantize_model: calibration is empty; pass token-id tensors (calibration_from_texts).")
    modules = dict(model.named_modules())
    for t in target_names:
        if t not in modules:
            raise ConfigError(f"gptq_quantize_model: no module named {t!r}.{did_you_mean(t, modules)}")
        if not isinstance(modules[t], nn.Linear):
            raise ConfigError(f"gptq_quantize_model: {t!r} is a {type(modules[t]).__name__}, not nn.Linear.")
        check_tile(tuple(modules[t].weight.shape), tile, layer=t)
    layers_name, layers = _find_decoder_layers(model, target_names)
    stage_res = [re.compile(s) for s in stages]

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    # 1. capture the inputs (args, kwargs) of block 0 for every calibration sample
    captured: list[tuple[tuple, dict]] = []

    def _capture(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(_capture, with_kwargs=True)
    try:
        for ids in calibration:
            ids = torch.as_tensor(ids, dtype=torch.long, device=device)
            if ids.dim() == 1:
                ids = ids.unsqueeze(0)
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(calibration):
        raise ConfigError("gptq_quantize_model: the forward pass never reached the first decoder block.")

    def _split(args, kwargs):
        if args:
            return args[0], args[1:], kwargs
        kwargs = dict(kwargs)
        return kwargs.pop("hidden_states"), (), kwargs

    hidden = []
    extra = []
    for args, kwargs in captured:
        h, rest, kw = _split(args, kwargs)
        hidden.append(h)
        extra.append((rest, kw))

    def _run_block(layer):
        # a model spread over GPUs (device_map="auto"): a block's inputs go to that block's device (accelerate's
        # hooks would do the same where they exist; models placed by hand have none)
        dev = _module_device(layer)
        outs = []
        for h, (rest, kw) in zip(hidden, extra):
            h, rest, kw = _to_device(h, dev), _to_device(rest, dev), _to_device(kw, dev)
            out = layer(h, *rest, **kw)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outs

    result: dict = {}
    try:
        for li, layer in enumerate(layers):
            prefix = f"{layers_name}.{li}."
            local = [t[len(prefix):] for t in target_names if t.startswith(prefix)]
            if local:
                if true_sequential:
                    groups: list[list[str]] = [[] for _ in stage_res]
                    for sub in local:
                        for gi, rx in enumerate(stage_res):
                            if rx.search(sub):
                                groups[gi].append(sub)
                                break
                        else:
                            raise ConfigError(
                                f"gptq_quantize_model: {prefix + sub!r} matches none of the true-sequential stages "
                                f"{list(stages)}; pass stages=... or true_sequential=False."
                            )
                    groups = [g for g in groups if g]
                else:
                    groups = [local]
                for group in groups:
                    accs = {}
                    handles = []
                    for sub in group:
                        lin = layer.get_submodule(sub)
                        accs[sub] = HessianAccumulator(lin.in_features, device=lin.weight.device)
                        handles.append(accs[sub].attach(lin))
                    try:
                        _run_block(layer)
                    finally:
                        for hd in handles:
                            hd.remove()
                    for sub in group:
                        lin = layer.get_submodule(sub)
                        codes, scale, zero = gptq_quantize_weight(
                            lin.weight, accs[sub].H, bits, tile, damp=damp, block_size=block_size,
                            group_params=group_params, dead=dead,
                        )
                        ql = QuantLinear.from_quantized(
                            codes, scheme, scales=scale, zeros=zero,
                            bias=None if lin.bias is None else lin.bias.detach().clone(),
                        )
                        ql = ql.to(device=lin.weight.device)
                        _set_submodule(layer, sub, ql)
                        result[prefix + sub] = ql
                    del accs
            if li + 1 < len(layers):
                hidden = _run_block(layer)
    finally:
        model.train(was_training)
    return {t: result[t] for t in target_names}


# ------------------------------------------------------------------------------------- calibration


def calibration_from_texts(tokenizer, texts: Sequence[str], n_samples: int, seq_len: int, seed: int,
                           sep: str = "\n\n") -> list[torch.LongTensor]:
    """``n_samples`` random windows of ``seq_len`` tokens, each ``(1, seq_len)`` int64.

    The texts are joined with ``sep`` (``"\\n\\n"``, as the GPTQ reference does for WikiText-2) and tokenized
    once; window starts are drawn uniformly from ``[0, n_tokens - seq_len]`` with a private
    ``torch.Generator`` seeded with ``seed`` (no global RNG state is read or changed), so the result is a pure
    function of (tokenizer, texts, n_samples, seq_len, seed).
    """
    if n_samples < 1 or seq_len < 1:
        raise ConfigError(f"calibration_from_texts: n_samples={n_samples} and seq_len={seq_len} must be >= 1.")
    texts = [t for t in texts if t]
    if not texts:
        raise ConfigError("calibration_from_texts: no non-empty texts given.")
    enc = tokenizer(sep.join(texts), return_tensors="pt")
    ids = enc["input_ids"][0].to(torch.long)
    n = ids.numel()
    if n < seq_len:
        raise ConfigError(
            f"calibration_from_texts: the texts give only {n} tokens, fewer than seq_len={seq_len}; "
            f"pass more text or a shorter seq_len."
        )
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seq_len + 1, (n_samples,), generator=gen)
    return [ids[s:s + seq_len].clone().unsqueeze(0) for s in starts.tolist()]
