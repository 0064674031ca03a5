"""``peft``: any method of the peft library as a baseline, in one config line, on the suite's bases.

    {name: peft, base: nf4, peft: {peft_type: LORA, r: 16, lora_alpha: 16, use_dora: true}}   # QDoRA
    {name: peft, base: 16bit, peft: {peft_type: VERA, r: 256}}                               # VeRA, 16-bit base
    {name: peft, base: nf4, adapter: path/or/hub-id}       # a peft adapter trained elsewhere, evaluated only

The ``peft`` mapping is a peft config (``peft_type`` plus that config class's own fields); it is built with
peft's classes and injected with ``peft.get_peft_model``, so the layers, the initialisation and the merge are
peft's. The suite supplies what it supplies for its own methods: the frozen base (``base: 16bit`` shares
``lora``'s, ``base: nf4`` shares ``qlora``'s bitsandbytes NF4 + double quantization, block 64), the adapter
targets (``targets``, every linear layer but the head by default, given to peft as ``target_modules``), the
training loop with resume, the evaluation and the records.

* Validation happens before any compute: an unknown peft type or field is a ConfigError with peft's own
  field list and a did-you-mean; whether peft can wrap the chosen base is checked on a 256x256 probe layer of that
  base (a bitsandbytes ``Linear4bit`` for ``nf4``), with a forward and a backward pass, so a combination peft
  does not support fails with peft's reason and the combinations that work. The suite's own INT bases
  (``QuantLinear``) are not offered: peft has no layer for them.
* Accounting: trainable parameters and adapter FLOPs per token of a layer are *measured* on a probe layer of
  that shape (torch's FLOP counter on one token, minus the base matmul), since no closed form covers every peft
  method; a run's record uses the count of the model itself.
* Saved adapters are peft adapter folders (``adapter_config.json``, ``adapter_model.safetensors``) that
  ``PeftModel.from_pretrained`` loads onto the same base, plus ``qftbench_adapter.json`` (this entry, :data:`methods.adapter_io.PEFT_CONFIG`).
* Deployment: ``4+16`` on the NF4 base, ``fp16-merge`` on the 16-bit base. A 16-bit merge of an NF4 run merges
  with peft's ``merge_and_unload`` into the de-quantized NF4 weights (what QLoRA's own fp16 merge means), not into
  re-quantized NF4 as ``merge_and_unload`` on a ``Linear4bit`` would.
* Not supported (each a ConfigError saying so): prompt-learning types (they change the input, not a layer),
  types that need the training loop's cooperation (AdaLoRA's rank allocation, X-LoRA, Poly) and initialisations
  that need data (``init_lora_weights: eva | corda``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import torch
from torch import nn

from .adapter_io import PEFT_CONFIG
from .atomic import atomic_write
from .base import SEED, TARGETS, Hyper, Method, _set_module
from .errors import ConfigError, did_you_mean

BASES = ("16bit", "nf4")
#: peft types whose training needs more than forward/backward/step (not wired into the suite's loop yet)
NEEDS_LOOP = {"ADALORA": "AdaLoRA reallocates ranks with update_and_allocate() after every optimizer step",
              "XLORA": "X-LoRA needs a classifier over several trained adapters",
              "POLY": "Poly needs task ids in every batch"}
DATA_INITS = ("eva", "corda")


def _peft():
    import peft

    return peft


def peft_types() -> list[str]:
    """peft types this method can express: every non-prompt-learning type of the installed peft."""
    peft = _peft()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    out = []
    for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        if issubclass(cls, peft.PromptLearningConfig):
            continue
        out.append(str(getattr(t, "value", t)))
    return sorted(out)


def config_class(peft_type: Any):
    """peft's config class of ``peft_type`` (e.g. ``LORA`` -> ``LoraConfig``); ConfigError for anything else."""
    peft = _peft()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    names = {str(getattr(t, "value", t)): c for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    key = str(peft_type).upper() if isinstance(peft_type, str) else peft_type
    if key not in names:
        raise ConfigError(f"peft: peft_type={peft_type!r} is not a peft type of peft {peft.__version__}."
                          f"{did_you_mean(str(peft_type).upper(), peft_types())} Types: {', '.join(peft_types())}.")
    cls = names[key]
    if issubclass(cls, peft.PromptLearningConfig):
        raise ConfigError(f"peft: peft_type={key} is a prompt-learning method (it changes the input, not the "
                          f"layers) and does not fit a frozen quantized base here; use one of: "
                          f"{', '.join(t for t in peft_types() if t not in NEEDS_LOOP)}.")
    if key in NEEDS_LOOP:
        raise ConfigError(f"peft: peft_type={key} is not supported yet: {NEEDS_LOOP[key]}, which the suite's "
                          "training loop does not do.")
    return cls


def _fields(cls) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(cls)
                  if f.init and not f.name.startswith("_") and f.name not in ("peft_type", "peft_version"))


# fields the suite owns: the targets come from the method entry's `targets`, the type from peft_type
OWNED = {"target_modules": "set `targets:` on the method entry (it decides both the quantized layers and peft's "
                           "target_modules)",
         "task_type": "the suite always fine-tunes a causal LM", "base_model_name_or_path": "the run's model decides",
         "inference_mode": "the suite sets it per step", "revision": "the run's model decides"}


class Peft(Method):
    name = "peft"
    summary = "any peft method (LoRA/DoRA/PiSSA/rsLoRA, VeRA, IA3, LoHa, OFT, HiRA, ...) on a 16-bit or NF4 base"
    deploy_summary = "4+16 (base: nf4) or fp16-merge (base: 16bit)"
    hyperparameters = {
        "base": Hyper("16bit", str, "the frozen base peft wraps: '16bit' (shares lora's) or 'nf4' (bitsandbytes NF4 "
                      "+ double quantization, block 64: shares qlora's)", choices=BASES),
        "peft": Hyper({}, dict, "a peft config: peft_type plus that class's fields, e.g. {peft_type: LORA, r: 16, "
                      "lora_alpha: 16, use_dora: true}"),
        "adapter": Hyper("", str, "a peft adapter folder (or hub id) to evaluate without training; its "
                         "adapter_config.json is the peft config"),
        "targets": TARGETS, "seed": SEED,
    }
    not_grid_axes = ("rank",)  # the rank lives in the peft config (r), not in a suite axis
    accounting_source = "measured: torch FLOP counter and parameter count on a probe layer of each shape"

    def __init__(self, **hp: Any):
        if isinstance(hp.get("peft"), dict):
            hp["peft"] = json.loads(json.dumps(hp["peft"]))  # a private, JSON-plain copy
        super().__init__(**hp)

    # ----------------------------------------------------------------------------------- config
    @property
    def deploy(self) -> str:  # type: ignore[override]
        return "4+16" if self.hp["base"] == "nf4" else "fp16-merge"

    def validate(self) -> None:
        spec = dict(self.hp["peft"])
        if self.hp["adapter"]:
            if spec:
                raise ConfigError("peft: give either adapter= (a trained peft adapter, evaluated as it is) or peft= "
                                  "(a config to train), not both: the adapter's adapter_config.json is its config.")
            spec = _adapter_config(self.hp["adapter"])
        if "peft_type" not in spec:
            raise ConfigError("peft: the peft mapping needs peft_type, e.g. {peft_type: LORA, r: 16, lora_alpha: 16}"
                              f"; peft types: {', '.join(peft_types())}.")
        cls = config_class(spec["peft_type"])
        fields = _fields(cls)
        for k in spec:
            if k == "peft_type":
                continue
            if k in OWNED and not self.hp["adapter"]:
                raise ConfigError(f"peft: field {k!r} is set by the suite: {OWNED[k]}.")
            if k not in fields and not self.hp["adapter"]:
                raise ConfigError(f"peft: {cls.__name__} has no field {k!r}.{did_you_mean(k, fields)} "
                                  f"Its fields: {', '.join(f for f in fields if f not in OWNED)}.")
        init = spec.get("init_lora_weights")
        if isinstance(init, str) and init.lower() in DATA_INITS:
            raise ConfigError(f"peft: init_lora_weights={init!r} needs calibration data at initialisation "
                              "(peft's initialize_lora_eva_weights / preprocess_corda), which the suite does not run "
                              "yet; use True, 'gaussian', 'pissa', 'olora' or 'loftq' (16-bit base only).")
        probe(self.hp["base"], self._spec_key())  # can peft wrap this base?
        super().validate()

    def _peft_dict(self) -> dict[str, Any]:
        """The peft config as a dict, with the suite's target_modules (the saved adapter's own, for adapter=)."""
        if self.hp["adapter"]:
            saved = _adapter_config(self.hp["adapter"])
            fields = _fields(config_class(saved["peft_type"]))
            spec = {k: v for k, v in saved.items() if k in fields or k == "peft_type"}
            spec.pop("base_model_name_or_path", None)
            spec.pop("revision", None)
            spec["inference_mode"] = False
            return spec
        targets = self.hp["targets"]
        return {**self.hp["peft"], "peft_type": str(self.hp["peft"]["peft_type"]).upper(),
                "target_modules": "all-linear" if targets == "all-linear" else
                ([targets] if isinstance(targets, str) else list(targets))}

    def _spec_key(self) -> str:
        """:meth:`_peft_dict` as canonical JSON: the cache key of :func:`probe` and :func:`measure`."""
        return json.dumps(self._peft_dict(), sort_keys=True)

    def peft_config(self):
        """peft's config object of this entry."""
        spec = self._peft_dict()
        cls = config_class(spec["peft_type"])
        return cls(**{k: v for k, v in spec.items() if k != "peft_type"})

    def scheme(self):
        if self.hp["base"] == "nf4":
            from .quant.scheme import QuantScheme
            return QuantScheme(kind="bnb-nf4", bits=4, blocksize=64)
        return None

    def geometry(self):
        return None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["peft"] = {"version": _peft().__version__, "config": _plain(self.peft_config().to_dict())}
        return d

    # ------------------------------------------------------------------------------- accounting
    def trainable_params(self, d_out: int, d_in: int) -> int:
        return self.layer_trainable_params("proj", d_out, d_in)

    def adapter_flops_per_token(self, d_out: int, d_in: int) -> int:
        return self.layer_adapter_flops_per_token("proj", d_out, d_in)

    def layer_trainable_params(self, name: str, d_out: int, d_in: int) -> int:
        return measure(self.hp["base"], self._spec_key(), d_out, d_in, name.split(".")[-1])[0]

    def layer_adapter_flops_per_token(self, name: str, d_out: int, d_in: int) -> int:
        return measure(self.hp["base"], self._spec_key(), d_out, d_in, name.split(".")[-1])[1]

    # ------------------------------------------------------------------------------------ inject
    def inject(self, model: nn.Module, adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
        self.check_injectable(model)
        model.requires_grad_(False)
        self._check_bnb_cpu_widths(model)
        _wrap(model, self.peft_config(), self.hp["seed"])
        if adapter_dtype != torch.float32:  # peft makes its adapter weights float32; cast them as the run asks
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(adapter_dtype)
        if self.hp["adapter"]:
            _load_weights(model, self.hp["adapter"])
            model.requires_grad_(False)  # evaluated as it is: nothing to train
        model.qft_method = self
        return model

    def check_shapes(self, shapes) -> None:
        """The base's checks, and for ``adapter=`` the adapter's LoRA matrices against the model's layer shapes
        (from the safetensors header alone), so an adapter of another base model fails before any model is
        loaded."""
        shapes = list(shapes)
        super().check_shapes(shapes)
        if self.hp["adapter"]:
            _check_adapter_shapes(self.hp["adapter"], shapes)

    def _check_bnb_cpu_widths(self, model: nn.Module) -> None:
        """DoRA on NF4 takes its weight norms from bitsandbytes' own dequantization, whose CPU kernel is wrong for
        input widths that are not multiples of 64 (methods.quant.bnb); refuse that rather than train on it."""
        from .errors import ShapeError

        if self.hp["base"] != "nf4" or not self._peft_dict().get("use_dora"):
            return
        for name in model.qft_base["layers"]:
            mod = model.get_submodule(name)
            if mod.weight.device.type == "cpu" and mod.in_features % 64:
                raise ShapeError(f"peft: DoRA on the nf4 base on the CPU: layer {name} has in_features="
                                 f"{mod.in_features}, not a multiple of 64, where bitsandbytes' CPU dequantization "
                                 "(which peft's DoRA uses for its weight norms) is wrong. Use base: 16bit, run on a "
                                 "GPU, or a model whose widths are multiples of 64 (LLaMA's and SmolLM2's are).")

    # ------------------------------------------------------------------------------------- merge
    def merge(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return self.merge_dense(model, dtype)

    def merge_dense(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """peft's ``merge_and_unload``; on the NF4 base into the de-quantized NF4 weights (see module docstring)."""
        from .quant.modules import dequantize_module

        dtype = dtype or torch.float16
        pm = model.__dict__.get("qft_peft")
        if pm is None:
            raise ConfigError("peft: merge needs a model prepared by this method.")
        if self.hp["base"] == "nf4":
            state = _adapter_state(model)
            pm.base_model.unload()
            _drop_peft_attrs(model)
            for name in model.qft_base["layers"]:
                mod = model.get_submodule(name)
                lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=torch.float32)
                lin.weight.data.copy_(dequantize_module(mod))
                if mod.bias is not None:
                    lin.bias.data.copy_(mod.bias.detach())
                lin.requires_grad_(False)
                _set_module(model, name, lin)
            pm = _wrap(model, self.peft_config(), self.hp["seed"])
            _set_state(model, state)
        pm.base_model.merge_and_unload()
        _drop_peft_attrs(model)
        for name in model.qft_base["layers"]:
            model.get_submodule(name).to(dtype)
        model.qft_merged = "fp16-merge"
        model.qft_method = None
        return model

    # ---------------------------------------------------------------------------------- adapters
    def save_adapter(self, model: nn.Module, directory) -> None:
        """A peft adapter folder (what ``PeftModel.save_pretrained`` writes) plus ``qftbench_adapter.json``."""
        from pathlib import Path

        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # the config as written (peft's injected copy has target_modules expanded to full module names, which
        # e.g. IA3's own check then rejects against feedforward_modules on reload)
        cfg = self.peft_config()
        cfg.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        tensors = {f"base_model.model.{k}": v.contiguous().cpu() for k, v in _adapter_state(model).items()}
        atomic_write(d / "adapter_model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        atomic_write(d / "adapter_config.json",
                     lambda p: Path(p).write_text(json.dumps(_plain(cfg.to_dict()), indent=2, sort_keys=True)))
        own = {"format": "qftbench-peft-adapter", "version": 1, **_plain(self.describe()),
               "tensors": {k: list(v.shape) for k, v in tensors.items()}}
        atomic_write(d / PEFT_CONFIG, lambda p: Path(p).write_text(json.dumps(own, indent=2, sort_keys=True)))

    def load_adapter(self, model: nn.Module, directory) -> None:
        _load_weights(model, str(directory))


# --------------------------------------------------------------------------------------- helpers
def label(entry: dict) -> str:
    """A short, file-safe name of a peft method entry: ``dora``, ``rslora``, ``pissa``, ``lora``, ``vera``,
    ``ia3``, ... (the LoRA variants by what they change), ``adapter`` for a trained adapter; used in run ids and as
    the method's name in the tables (``peft-<label>-<base>``)."""
    if entry.get("adapter"):
        return "adapter"
    spec = entry.get("peft") or {}
    kind = str(spec.get("peft_type", "?")).lower()
    if kind != "lora":
        return kind
    parts = [v for k, v in (("use_dora", "dora"), ("use_rslora", "rslora")) if spec.get(k)]
    init = spec.get("init_lora_weights")
    if isinstance(init, str):
        parts.append(init.lower().split("_")[0].replace("[", "").replace("]", ""))
    return "+".join(parts) or "lora"


def table_name(entry: dict) -> str:
    """The method's name in the tables: ``peft-<label>-<base>``, e.g. ``peft-dora-nf4``."""
    return f"peft-{label(entry)}-{entry.get('base', '16bit')}"


def _plain(x):
    """JSON-plain (sets -> sorted lists, enums -> values)."""
    return json.loads(json.dumps(x, default=lambda o: sorted(o) if isinstance(o, (set, frozenset))
                                 else getattr(o, "value", str(o))))


@functools.lru_cache(maxsize=64)
def _adapter_config(adapter: str) -> dict[str, Any]:
    import os

    path = os.path.join(adapter, "adapter_config.json")
    if os.path.isdir(adapter):
        if not os.path.isfile(path):
            raise ConfigError(f"peft: adapter={adapter!r} is a folder without adapter_config.json (not a peft "
                              "adapter: PeftModel.save_pretrained writes one).")
        return json.loads(open(path).read())
    try:
        return _peft().PeftConfig.from_pretrained(adapter).to_dict()
    except Exception as e:  # noqa: BLE001 - the hub lookup: any failure is the same user error
        raise ConfigError(f"peft: adapter={adapter!r} is neither a local peft adapter folder nor a reachable hub "
                          f"id ({type(e).__name__}: {str(e)[:200]}).") from None


def _wrap(model: nn.Module, config, seed: int):
    """``peft.get_peft_model`` in place (the suite keeps using ``model``; the PeftModel is kept beside it)."""
    peft = _peft()
    _drop_peft_attrs(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pm = peft.get_peft_model(model, config, autocast_adapter_dtype=True)
    model.__dict__["qft_peft"] = pm  # not a submodule (that would be a cycle)
    return pm


def _drop_peft_attrs(model: nn.Module) -> None:
    for k in ("peft_config",):
        if k in model.__dict__:
            del model.__dict__[k]
    model.__dict__.pop("qft_peft", None)


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    pm = model.__dict__["qft_peft"]
    return {k.removeprefix("base_model.model."): v.detach()
            for k, v in get_peft_model_state_dict(pm).items()}


def _set_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    pm = model.__dict__["qft_peft"]
    res = set_peft_model_state_dict(pm, {f"base_model.model.{k}": v for k, v in state.items()})
    unexpected = [k for k in res.unexpected_keys]
    missing = [k for k in res.missing_keys if "lora_" in k or pm.base_model.prefix in k]
    if unexpected or missing:
        raise ConfigError(f"peft: the adapter does not fit this model: missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}.")


def _check_adapter_shapes(adapter: str, shapes) -> None:
    """A LoRA-shaped peft adapter (``lora_A`` (r, in), ``lora_B`` (out, r)) against the model's layers
    ``(name, out, in)``; other peft types are checked when the adapter is loaded."""
    import os

    path = os.path.join(adapter, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return  # a hub id or a .bin adapter: checked when it is loaded
    from safetensors import safe_open

    by_name = {n: (o, i) for n, o, i in shapes}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix("base_model.model.")
            for part, axis in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
                if name.endswith(part) and name[: -len(part)] in by_name:
                    layer = name[: -len(part)]
                    want = by_name[layer][1] if axis == 1 else by_name[layer][0]
                    got = f.get_slice(key).get_shape()[axis]
                    if got != want:
                        raise ConfigError(
                            f"peft: adapter {adapter!r} does not fit this model: {key} has "
                            f"{'in' if axis == 1 else 'out'}_features {got}, the model's {layer} has {want} "
                            "(an adapter trained on another base model?).")


def _load_weights(model: nn.Module, adapter: str) -> None:
    from peft.utils import load_peft_weights

    try:
        weights = load_peft_weights(adapter, device="cpu")
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"peft: cannot read the adapter weights of {adapter!r} ({type(e).__name__}: "
                          f"{str(e)[:200]}).") from None
    state = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
    own = _adapter_state(model)
    bad = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise ConfigError(f"peft: adapter {adapter!r} does not fit this model: {k} has shape "
                          f"{tuple(state[k].shape)} there but {tuple(own[k].shape)} here (an adapter trained on "
                          "another base model?).")
    _set_state(model, state)


class _Probe(nn.Module):
    """One linear layer named like the decoder projection it stands for (peft matches targets, and IA3 its
    feed-forward modules, by name)."""

    def __init__(self, layer: nn.Module, name: str = "proj"):
        super().__init__()
        self.name = name
        self.add_module(name, layer)

    def forward(self, x):
        return getattr(self, self.name)(x)


PROBE = 256  # the probe layer's width: divisible by every block/vector size peft's defaults need (VB-LoRA: 256)


def _probe_layer(base: str, d_out: int, d_in: int, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out, bias=False, device=device)
    if base == "nf4":
        from .quant.bnb import to_linear4bit
        return to_linear4bit(lin, compute_dtype=torch.float32)
    return lin.requires_grad_(False)


def _probe_config(spec: str, *, counting: bool, name: str = "proj"):
    spec = json.loads(spec)
    spec["target_modules"] = [name]
    if spec.get("feedforward_modules"):  # IA3: is the probe layer one of the feed-forward layers?
        ff = spec["feedforward_modules"]
        ff = [ff] if isinstance(ff, str) else list(ff)
        spec["feedforward_modules"] = [name] if (name == "proj" or name in ff) else []
    if counting:  # shapes only: skip data-free but costly initialisations (PiSSA's SVD, LoftQ)
        for k in ("init_lora_weights", "init_weights"):
            if k in spec:
                spec[k] = True
        spec.pop("loftq_config", None)
    spec.pop("rank_pattern", None), spec.pop("alpha_pattern", None)
    cls = config_class(spec.pop("peft_type"))
    return cls(**spec)


@functools.lru_cache(maxsize=128)
def probe(base: str, spec: str) -> None:
    """Wrap a :data:`PROBE`-wide layer of ``base`` with the peft config ``spec`` and run a forward and a backward pass;
    a ConfigError with peft's reason and what works instead if peft cannot."""
    peft = _peft()
    try:
        cfg = _probe_config(spec, counting=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"peft: peft rejects the config {spec}: {e}") from None
    try:
        model = _Probe(_probe_layer(base, PROBE, PROBE))
        model.requires_grad_(False)
        pm = peft.get_peft_model(model, cfg)
        x = torch.randn(2, PROBE, requires_grad=False)
        out = pm(x)
        trainable = [p for p in pm.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("it has no trainable parameters on this layer")
        out.float().square().mean().backward()
    except Exception as e:  # noqa: BLE001 - any failure of peft here is the answer to "can peft wrap it?"
        kind = json.loads(spec)["peft_type"]
        reason = f"{type(e).__name__}: {str(e)[:300]}"
        if base == "nf4":
            try:
                probe("16bit", spec)
            except ConfigError:
                pass
            else:
                raise ConfigError(
                    f"peft: peft {peft.__version__} cannot train {kind} on the nf4 base (bitsandbytes Linear4bit; "
                    f"it can on the 16-bit base): {reason}. Use base: 16bit, or a peft type that wraps Linear4bit "
                    f"({', '.join(nf4_types())}); the suite's INT bases (QuantLinear) cannot be wrapped by peft at "
                    "all (use qalora, qahira or peqa for those).") from None
        raise ConfigError(f"peft: peft {peft.__version__} cannot train this {kind} config on a "
                          f"{PROBE}x{PROBE} {'bitsandbytes Linear4bit' if base == 'nf4' else 'nn.Linear'} layer: "
                          f"{reason}. Fix the config (peft's own message above).") from None


#: peft types checked to train on bitsandbytes NF4 in this suite's tests (the error message lists them; the probe,
#: not this list, decides)
NF4_CHECKED = ("LORA (incl. use_dora, use_rslora, init_lora_weights: pissa/olora/gaussian)", "VERA", "IA3", "BOFT",
               "OFT", "FOURIERFT", "RANDLORA", "SHIRA", "MISS", "ROAD", "WAVEFT")


def nf4_types() -> list[str]:
    return list(NF4_CHECKED)


@functools.lru_cache(maxsize=1024)
def measure(base: str, spec: str, d_out: int, d_in: int, name: str = "proj") -> tuple[int, int]:
    """(trainable parameters, adapter matmul FLOPs per token) of one ``(d_out, d_in)`` layer, measured on a
    16-bit probe layer of that shape (the count does not depend on the base's storage): the FLOPs are torch's
    FLOP counter on two tokens minus one token through the wrapped layer (the marginal cost of a token), minus
    the base matmul ``2·d_out·d_in``. ``name``: the layer's own name (its last component), for the peft methods
    whose layers differ by name (IA3's feed-forward modules)."""
    from torch.utils.flop_counter import FlopCounterMode

    peft = _peft()
    model = _Probe(_probe_layer("16bit", d_out, d_in, device="meta"), name)
    pm = peft.get_peft_model(model, _probe_config(spec, counting=True, name=name))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    pm.eval()
    flops = []
    for tokens in (1, 2):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            pm(torch.zeros(tokens, d_in, device="meta"))
        flops.append(fc.get_total_flops())
    # the marginal cost of one more token; a per-forward part that does not grow with the tokens (DoRA's weight
    # norm: 2·r·d_out·d_in per forward) is left out, as it is amortised over the batch's tokens
    return int(trainable), int(max(flops[1] - flops[0] - 2 * d_out * d_in, 0))
