"""The :class:`Method` base class: hyperparameter validation, target layers, prepare and merge.

A method is a small subclass that declares its hyperparameters, its quantizer (:meth:`Method.scheme`) and its
adapter geometry (:meth:`Method.geometry`); the base class does the rest:

* :meth:`Method.prepare` checks every target layer's shape *before* any compute, quantizes the base (RTN, or
  GPTQ with calibration data), injects one :class:`~methods.adapter.AdapterLinear` per target layer and
  freezes everything but the adapters;
* :meth:`Method.merge` turns the prepared model into the deployable one: an exact INT merge into the zero
  points (QA-LoRA, QA-HiRA), or a merge into a 16-bit dense weight (LoRA, QLoRA, LoftQ, Q-BaRA);
* :meth:`Method.trainable_params` and :meth:`Method.adapter_flops_per_token` give the exact accounting of one
  layer from its shape alone.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from .adapter import AdapterLinear, PooledAdapter, layer_generator
from .errors import ConfigError, ShapeError, did_you_mean


@dataclasses.dataclass(frozen=True)
class Hyper:
    """One hyperparameter: default, accepted type, allowed values and a one-line description."""

    default: Any
    type: type | tuple[type, ...]
    doc: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None  # exclusive

    def check(self, method: str, name: str, value: Any) -> Any:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            want = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{method}: hyperparameter {name}={value!r} has type {type(value).__name__}; "
                              f"expected {want} ({self.doc}).")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{method}: {name}={value!r} is not supported; choose one of {list(self.choices)}."
                              + (did_you_mean(value, self.choices) if isinstance(value, str) else ""))
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{method}: {name}={value!r} must be >= {self.minimum} ({self.doc}).")
        if self.maximum is not None and value >= self.maximum:
            raise ConfigError(f"{method}: {name}={value!r} must be < {self.maximum} ({self.doc}).")
        return value


# Hyperparameters shared by the adapter methods; methods pick and override these.
RANK = Hyper(64, int, "nominal rank r; the scaling is s = alpha / r", minimum=1)
ALPHA = Hyper(16.0, float, "lora_alpha; the scaling is s = alpha / rank", minimum=0)
DROPOUT = Hyper(0.0, float, "dropout on the pooled adapter input", minimum=0.0, maximum=1.0)
TARGETS = Hyper("all-linear", (str, list),
                "'all-linear' (every nn.Linear except the output head) or a list of module-name suffixes, "
                "e.g. ['q_proj', 'v_proj']")
SEED = Hyper(0, int, "seed of the adapter initialisation (per layer, independent of layer order)", minimum=0)
QUANTIZER = Hyper("rtn", str, "how the INT base is quantized: 'rtn' (round-to-nearest, no data) or 'gptq' "
                  "(the papers' choice; pass calibration= to prepare)", choices=("rtn", "gptq"))
GPTQ_GROUPS = Hyper("updated", str, "GPTQ only: the weights a group's scale and zero come from: 'updated' (fully "
                    "error-updated, this suite's default) or 'released' (as GPTQ-for-LLaMa and AutoGPTQ v0.3.0, "
                    "which QA-LoRA's README installs: the updates of the earlier columns of the current 128-column "
                    "batch not yet applied; identical when the group is 128 wide)", choices=("updated", "released"))
INIT_LOWRANK = Hyper("kaiming", str, "init of A (B = 0): kaiming-uniform(a=sqrt 5) as nn.Linear and peft, "
                     "xavier-uniform, or gaussian (std 1/r)", choices=("kaiming", "xavier", "gaussian"))
POOL = Hyper("mean", str, "pooling scale: 'mean' (official code) or 'sum' (the QA-LoRA paper's formula)",
             choices=("mean", "sum"))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Adapter geometry of a method: pooling ``p``, repeat ``q``, inner rank (``None``: one full ``H``)."""

    p: int
    q: int
    rank: int | None
    init: str
    pool: str = "mean"


class Method:
    """Base class of every method. Subclasses set the class attributes and override the hooks."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    deploy: ClassVar[str] = ""  # "fp16-merge", "int-merge" or "4+16"
    #: the method's name in tables and figures (default: ``name``) and its (colour, marker) in the figures (default:
    #: a stable colour and marker derived from the name, qftbench.plots)
    label: ClassVar[str] = ""
    plot_style: ClassVar[tuple[str, str] | None] = None
    #: the rows of the published tables (qftbench/reference/paper_results.csv, column method) that this method
    #: reproduces, each with the deployment mode compared to it ("QLoRA w/ GPTQ": "requant")
    paper_rows: ClassVar[dict[str, str]] = {}
    #: the adapter is a plain LoRA (B·A on every target layer), so peft can load it (methods.export_peft_adapter)
    peft_exportable: ClassVar[bool] = False
    hyperparameters: ClassVar[dict[str, Hyper]] = {}
    #: hyperparameters that a sweep's ``grid`` does not cross with this method (e.g. QA-HiRA's rank, which
    #: only enters the scaling); a method entry may still set them explicitly
    not_grid_axes: ClassVar[tuple[str, ...]] = ()
    #: training needs the gradient of the frozen base weight's matmul too (PEQA: the scales sit inside it);
    #: counted in the training FLOPs (qftbench.accounting)
    needs_base_weight_grad: ClassVar[bool] = False
    #: where the trainable-parameter and adapter-FLOP counts come from: a closed "formula" of the layer's shape,
    #: or "measured" on a probe layer (peft's methods); recorded with every run's accounting
    accounting_source: ClassVar[str] = "formula"

    @classmethod
    def display_label(cls) -> str:
        """The method's name in figures and listings: its ``label``, else its registered ``name``."""
        return cls.label or cls.name

    def __init__(self, **hp: Any):
        unknown = [k for k in hp if k not in self.hyperparameters]
        if unknown:
            k = unknown[0]
            raise ConfigError(
                f"method {self.name!r} has no hyperparameter {k!r}.{did_you_mean(k, self.hyperparameters)} "
                f"Its hyperparameters are: {', '.join(sorted(self.hyperparameters))}."
            )
        self.hp: dict[str, Any] = {}
        for k, spec in self.hyperparameters.items():
            value = hp.get(k, spec.default)
            self.hp[k] = spec.check(self.name, k, list(value) if isinstance(value, tuple) else value)
        self.validate()

    # ----------------------------------------------------------------------------------------- hooks
    def validate(self) -> None:
        """Cross-field checks (beyond the per-field ones); raise ConfigError."""
        if self.hp.get("gptq_groups", "updated") != "updated" and self.hp.get("quantizer") != "gptq":
            raise ConfigError(f"{self.name}: gptq_groups={self.hp['gptq_groups']!r} only applies to a GPTQ base; "
                              f"set quantizer='gptq' or drop gptq_groups.")
        scheme = self.scheme()
        if scheme is not None:
            scheme.validate()

    def scheme(self):
        """The :class:`~methods.quant.scheme.QuantScheme` of the frozen base, or ``None`` for a 16-bit base."""
        return None

    def geometry(self) -> Geometry | None:
        """The adapter geometry, or ``None`` for a method without a pooled adapter (PEQA)."""
        raise NotImplementedError

    @property
    def scaling(self) -> float:
        """``s = alpha / r`` with the nominal rank, as in all four reference codes."""
        return float(self.hp["alpha"]) / float(self.hp["rank"])

    def __getattr__(self, item: str) -> Any:
        hp = self.__dict__.get("hp")
        if hp is not None and item in hp:
            return hp[item]
        raise AttributeError(item)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hp.items())
        return f"methods.build({self.name!r}, {args})"

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for run records."""
        g = self.geometry()
        s = self.scheme()
        return {
            "method": self.name,
            "hyperparameters": dict(self.hp),
            "deploy": self.deploy,
            "geometry": dataclasses.asdict(g) if g else None,
            "scheme": dataclasses.asdict(s) if s else None,
        }

    # ---------------------------------------------------------------------------------- accounting
    def trainable_params(self, d_out: int, d_in: int) -> int:
        """Exact trainable parameters of one target layer of shape ``(d_out, d_in)``."""
        g = self.geometry()
        n_in, n_out = d_in // g.p, d_out // g.q
        return n_out * n_in if g.rank is None else g.rank * (n_in + n_out)

    def layer_trainable_params(self, name: str, d_out: int, d_in: int) -> int:
        """Trainable parameters of the target layer ``name`` (a method whose count depends on the layer's name, as
        peft's IA3 on feed-forward layers, overrides this; the others count from the shape alone)."""
        return self.trainable_params(d_out, d_in)

    def layer_adapter_flops_per_token(self, name: str, d_out: int, d_in: int) -> int:
        """:meth:`adapter_flops_per_token` of the target layer ``name``."""
        return self.adapter_flops_per_token(d_out, d_in)

    def adapter_flops_per_token(self, d_out: int, d_in: int) -> int:
        """Matrix-multiply FLOPs (2 per multiply-add, as torch's FLOP counter counts) of ``Δy`` for one token.

        Pooling, dropout, repeat and scaling are element-wise and not counted."""
        g = self.geometry()
        n_in, n_out = d_in // g.p, d_out // g.q
        return 2 * n_out * n_in if g.rank is None else 2 * g.rank * (n_in + n_out)

    # ------------------------------------------------------------------------------------ targets
    def target_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The linear layers this method adapts: every ``nn.Linear`` except the output head, or ``targets``."""
        if (any(isinstance(m, AdapterLinear) for m in model.modules()) or getattr(model, "qft_method", None)
                or getattr(model, "qft_base", None)):
            raise ConfigError("this model was already prepared by a method "
                              f"({getattr(getattr(model, 'qft_method', None), 'name', '?')}); prepare a fresh model.")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        linears = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and m is not head and n.split(".")[-1] != "lm_head"]
        targets = self.hp.get("targets", "all-linear")
        if targets == "all-linear":
            chosen = linears
        else:
            if isinstance(targets, str):
                targets = [targets]
            chosen = [(n, m) for n, m in linears if any(n == t or n.endswith("." + t) for t in targets)]
            suffixes = sorted({n.split(".")[-1] for n, _ in linears})
            for t in targets:
                if not any(n == t or n.endswith("." + t) for n, _ in linears):
                    raise ConfigError(f"{self.name}: targets entry {t!r} matches no linear layer of the model."
                                      f"{did_you_mean(t, suffixes)} Linear layers end in: {', '.join(suffixes)}.")
        if not chosen:
            raise ConfigError(f"{self.name}: the model has no target linear layers (targets={targets!r}).")
        return chosen

    def check_model(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Check every target layer's shape against the quantizer and the adapter; raise before any compute."""
        layers = self.target_layers(model)
        self.check_shapes([(name, mod.out_features, mod.in_features) for name, mod in layers])
        return layers

    def check_shapes(self, shapes: Iterable[tuple[str, int, int]]) -> None:
        """Raise :class:`ShapeError` for the first layer ``(name, d_out, d_in)`` the method cannot handle.

        Works from shapes alone, so a sweep is checked against a model's config before anything is loaded."""
        scheme, g = self.scheme(), self.geometry()
        for name, d_out, d_in in shapes:
            if scheme is not None:
                scheme.check_layer(name, d_out, d_in)
            if g is not None and (d_in % g.p or d_out % g.q):
                bad = []
                if d_in % g.p:
                    ok = [d for d in _divisors(d_in) if d > 1][:6]
                    bad.append(f"in={d_in} is not divisible by p={g.p} ({self._p_field()}); "
                               f"values dividing {d_in}: {ok}")
                if d_out % g.q:
                    bad.append(f"out={d_out} is not divisible by q={g.q}")
                raise ShapeError(f"{self.name}: layer {name} with weight shape (out={d_out}, in={d_in}): "
                                 + "; ".join(bad) + ". Choose a value that divides every target layer's width, "
                                 "or exclude the layer with targets=[...].")

    def _p_field(self) -> str:
        return "group_size"

    # ------------------------------------------------------------------------------------ prepare
    def prepare(self, model: nn.Module, calibration: Iterable[torch.Tensor] | None = None,
                adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
        """Quantize the base, inject the adapters, freeze all but the adapters. Modifies ``model`` in place."""
        return self.inject(self.quantize(model, calibration), adapter_dtype)

    def base_key(self) -> dict[str, Any]:
        """What determines the frozen base this method builds (runs with equal keys share one base)."""
        s = self.scheme()
        key = {"scheme": dataclasses.asdict(s) if s else None, "targets": self.hp.get("targets", "all-linear")}
        if s is not None and s.kind == "int":
            key["quantizer"] = self.hp.get("quantizer", "rtn")
            if key["quantizer"] == "gptq" and self.hp.get("gptq_groups", "updated") != "updated":
                key["gptq_groups"] = self.hp["gptq_groups"]  # (absent at the default: base folders unchanged)
        return key

    def quantize(self, model: nn.Module, calibration: Iterable[torch.Tensor] | None = None) -> nn.Module:
        """Check every target layer, then replace it by its frozen (quantized) base. In place.

        The layer names are kept in ``model.qft_base`` so that :meth:`inject` (possibly after the base was
        saved and loaded again with :func:`methods.base_io.load_quantized_base`) finds them."""
        layers = self.check_model(model)
        if self.hp.get("quantizer") == "gptq" and calibration is None:
            raise ConfigError(f"{self.name}: quantizer='gptq' needs calibration data: "
                              "prepare(model, calibration=[LongTensor batches]) "
                              "(see qftbench's calibration settings), or set quantizer='rtn'.")
        model.requires_grad_(False)
        bases = self.quantize_base(model, layers, calibration)
        errors = {name: weight_error(mod, bases[name]) for name, mod in layers}
        init = self.init_errors(errors)
        for name, _ in layers:
            _set_module(model, name, bases[name])
        model.qft_base = {"method": self.name, "key": self.base_key(), "layers": [n for n, _ in layers],
                          "weight_error": errors}
        if init is not errors:
            model.qft_base["init_error"] = init
        return model

    def init_errors(self, weight_errors: dict[str, float]) -> dict[str, float]:
        """Relative error of the layer the fine-tuning starts from, ``||W - (W_base + ΔW_0)|| / ||W||`` per target
        layer. Every adapter that starts at ``ΔW_0 = 0`` (B = 0) starts from its base: the weight error itself
        (returned as the same object). LoftQ overrides it with the error of its quantized base plus its SVD
        initialisation."""
        return weight_errors

    def check_injectable(self, model: nn.Module) -> dict:
        """The model's ``qft_base`` record, after checking that it holds this method's base and no adapters yet."""
        info = getattr(model, "qft_base", None)
        if info is None:
            raise ConfigError(f"{self.name}: inject() needs a model quantized by quantize() (or prepare() it).")
        if info["key"] != self.base_key():
            raise ConfigError(f"{self.name}: the model's base was built for {info['method']} with {info['key']}, "
                              f"not for this method's base {self.base_key()}.")
        if getattr(model, "qft_method", None) is not None:
            raise ConfigError("this model already has adapters; prepare a fresh model.")
        return info

    def inject(self, model: nn.Module, adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
        """Wrap every base layer recorded by :meth:`quantize` with this method's adapter. In place."""
        info = self.check_injectable(model)
        model.requires_grad_(False)
        for name in info["layers"]:
            _set_module(model, name, self.wrap_layer(name, model.get_submodule(name), adapter_dtype))
        model.qft_method = self
        return model

    def quantize_base(self, model: nn.Module, layers, calibration) -> dict[str, nn.Module]:
        """The frozen base module of every target layer (quantized, or the original for a 16-bit base)."""
        scheme = self.scheme()
        if scheme is None:
            return {name: mod for name, mod in layers}
        if self.hp.get("quantizer") == "gptq":
            from .quant.gptq import gptq_quantize_model
            return gptq_quantize_model(model, [n for n, _ in layers], scheme, list(calibration),
                                       group_params={"updated": "updated", "released": "reference"}[
                                           self.hp.get("gptq_groups", "updated")])
        from .quant.modules import make_linear

        return {name: make_linear(scheme, mod) for name, mod in layers}

    def wrap_layer(self, name: str, base: nn.Module, adapter_dtype: torch.dtype) -> nn.Module:
        g = self.geometry()
        adapter = PooledAdapter(
            base.in_features, base.out_features, p=g.p, q=g.q, rank=g.rank, scaling=self.scaling,
            dropout=self.hp.get("dropout", 0.0), init=g.init, pool=g.pool, dtype=adapter_dtype,
            generator=layer_generator(self.hp.get("seed", 0), name), layer_name=name)
        return AdapterLinear(base, adapter)

    # -------------------------------------------------------------------------------------- merge
    def merge(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """The deployable model, in place. 16-bit merge by default (``dtype`` defaults to float16)."""
        return self.merge_dense(model, dtype)

    def merge_dense(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """Merge every adapter into a dense 16-bit weight ``dequantize(base) + ΔW`` (the ``fp16-merge`` mode of
        every method, and what the "merged then re-quantized" baselines re-quantize). In place."""
        from .quant.modules import dequantize_module
        dtype = dtype or torch.float16
        for name, mod in list(model.named_modules()):
            if isinstance(mod, AdapterLinear):
                w = dequantize_module(mod.base) + mod.adapter.delta_weight()
                bias = getattr(mod.base, "bias", None)
                lin = nn.Linear(mod.in_features, mod.out_features, bias=bias is not None, dtype=dtype)
                lin.weight.data.copy_(w)
                if bias is not None:
                    lin.bias.data.copy_(bias.detach())
                lin.requires_grad_(False)
                _set_module(model, name, lin)
        model.qft_merged = "fp16-merge"
        model.qft_method = None
        return model


def weight_error(original: nn.Module, base: nn.Module) -> float:
    """Relative weight error of a frozen base: ``||W - W_base||_F / ||W||_F``, with ``W_base`` the weight the base
    computes with (dequantized; for LoftQ the quantized residual, without its adapter initialisation). 0 for a
    16-bit base."""
    from .quant.modules import dequantize_module

    with torch.no_grad():
        w = original.weight.detach().float()
        q = dequantize_module(base).to(w.device)
        return float((w - q).norm() / w.norm().clamp_min(1e-30))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _device_of(module: nn.Module) -> torch.device | None:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace ``model.<name>`` by ``new``, placed on the replaced module's device (its GPU when the model was
    spread over several GPUs with a device map, so that new adapters, bases and merged layers sit beside it)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    dev = _device_of(old) if old is not None else None
    if dev is not None and dev.type != "meta":
        devices = {t.device for t in list(new.parameters()) + list(new.buffers())}
        if devices and devices != {dev}:  # e.g. a new CPU adapter beside a base already on the GPU
            new = new.to(dev)
    setattr(parent, child, new)


def adapter_modules(model: nn.Module) -> Iterable[tuple[str, AdapterLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_finite(x: float, what: str) -> None:
    if not math.isfinite(x):
        raise ValueError(f"{what} is not finite: {x}")
