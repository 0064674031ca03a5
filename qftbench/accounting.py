"""Exact accounting of a method on a model, from the model's config alone (no weights are built).

    from qftbench.accounting import account
    account("llama-7b", "qalora", rank=64, group_size=32)["trainable_params"]      # 89_309_184

Models: the built-in configs shipped under ``qftbench/model_configs/*.json`` (``known_models()``; LlamaConfig field
names plus ``hub_id``), a path to a ``config.json`` (or a folder holding one), a ``dict`` or a transformers
config object. Only Llama-style decoders are described: per layer ``q, k, v, o, gate, up, down`` projections
(``k``/``v`` out = ``num_key_value_heads * head_dim``), two RMSNorms, a final norm, the token embedding and the
LM head (shared with the embedding when ``tie_word_embeddings``).

Everything method-specific comes from the method itself (``trainable_params``, ``adapter_flops_per_token``,
``scheme().stored_bits_per_param``, ``deploy``, ``describe``): nothing here re-derives a method's formula.

FLOPs (matrix-multiply FLOPs, 2 per multiply-add, as ``torch.utils.flop_counter.FlopCounterMode`` counts them;
element-wise work such as norms, softmax, pooling and rotary embeddings is not counted), per token at sequence
length ``S`` (``seq_len``, default :data:`DEFAULT_SEQ_LEN` = 512)::

    F_lin   = 2 · Σ_{all decoder projections} d_out · d_in        (target or not: the frozen base matmuls)
    F_head  = 2 · vocab · hidden                                   (the LM head; computed even when tied)
    F_attn  = 4 · S · n_heads · head_dim · n_layers                (QKᵀ and PV over the full S x S score matrix,
                                                                   as a dense/eager kernel computes it)
    F_ad    = Σ_{target layers} method.adapter_flops_per_token(d_out, d_in)

    forward  = F_lin + F_head + F_attn + F_ad
    backward = F_lin + F_head          activation gradients of the frozen matmuls (no weight gradient)
             + 2 · F_attn              both operands of QKᵀ and PV are activations
             + 2 · F_ad                adapter input- and weight-gradients
             + F_wgrad                 = 2 · Σ_{target layers} d_out · d_in, only for methods without a pooled
                                         adapter (``geometry() is None``: PEQA) that still have trainable
                                         parameters: these sit inside the base's dequantized weight, so the
                                         weight gradient is needed
    (a method without trainable parameters, e.g. ``base``, has no backward: backward = 0)
    train    = forward + backward = 2·(F_lin + F_head) + 3·F_attn + 3·F_ad (+ F_wgrad)

Autograd computes slightly less than ``backward``: the embeddings are frozen, so the input gradients of the
first layer's ``q/k/v`` projections (base and adapter) are never formed. ``train_flops_per_token`` is the
formula above (the usual convention); ``flops.first_layer_input_grad_base`` reports the base part of that
saving (the test suite checks both against ``FlopCounterMode``).

Bits per parameter of the *deployed* model (``bits_per_param``: the whole model; ``bits_per_param_target``: the
target layers only), over the base parameters (an adapter kept beside the base is reported separately):
target layers at ``method.scheme().stored_bits_per_param(d_out, d_in)`` (format ``"deployed"``), or 16 for a
16-bit base or an fp16 merge (``deploy == "fp16-merge"``); everything else (embeddings, LM head, norms,
non-target projections) at 16. A ``"4+16"`` deployment also ships the adapter at 16 bits: ``adapter_bits`` and
``deployed_bytes`` include it. ``bits_per_param_format`` is ``"deployed"``.

The deployed format (table in :mod:`methods.quant.scheme`): INTk with an fp16 scale and an fp16 float zero per
group of g weights, ``k + 32/g`` (int4 g32: 5.0, int4 g128: 4.25, int3 g32: 4.0; 8x4 tiles: ``k + 1``); NF4 with
double quantization as bitsandbytes stores it, ``4 + 8/64 + 32/(64·256)`` ≈ 4.127. Two more formats, same
layout of fields: ``bits_per_param_working`` / ``bits_per_param_target_working``, the suite's in-memory fp32
working copies (float32 scales and zeros: int4 g32 is 6.0 there); ``bits_per_param_gptq`` /
``bits_per_param_target_gptq``, the packed-integer-zero GPTQ checkpoint that ``export_gptq_checkpoint`` writes
(``k + (16 + k)/g``: int4 g32 4.625), only for an INT row-group base that is deployed quantized (else None).
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from methods.errors import ConfigError, ShapeError, did_you_mean

__all__ = [
    "DEFAULT_SEQ_LEN", "FP16_BITS", "known_models", "load_config", "linear_shapes", "base_params",
    "target_shapes", "base_flops_per_token", "account", "BITS_FORMAT", "bits_from_record",
]

DEFAULT_SEQ_LEN = 512
FP16_BITS = 16
#: the storage format ``bits_per_param`` / ``bits_per_param_target`` count (``bits_per_param_format``)
BITS_FORMAT = "deployed"
_CONFIG_PACKAGE_DIR = "model_configs"
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


# --------------------------------------------------------------------------------------------- configs
def _config_dir():
    return resources.files("qftbench").joinpath(_CONFIG_PACKAGE_DIR)


def _builtin() -> dict[str, dict[str, Any]]:
    out = {}
    for entry in _config_dir().iterdir():
        if entry.name.endswith(".json"):
            out[entry.name[:-5]] = json.loads(entry.read_text())
    return dict(sorted(out.items()))


def known_models() -> list[str]:
    """Names of the built-in model configs (``qftbench/model_configs/*.json``)."""
    return list(_builtin())


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ConfigError(f"model config of type {type(config).__name__} is not supported; pass a built-in name "
                      f"({', '.join(known_models())}), a path to a config.json, a dict or a transformers config.")


def load_config(model: Any) -> tuple[str, dict[str, Any]]:
    """``(name, config dict)`` of a built-in name, a hub id of a built-in model, a config.json path (or a folder
    holding one), a dict or a transformers config. Raises ConfigError for an unknown name."""
    if not isinstance(model, (str, os.PathLike)):
        cfg = _as_dict(model)
        return str(cfg.get("name") or cfg.get("_name_or_path") or "custom"), _check(cfg, "the given config")
    text = os.fspath(model)
    builtin = _builtin()
    key = text.lower()
    if key in builtin:
        return key, _check(builtin[key], key)
    for name, cfg in builtin.items():
        if cfg.get("hub_id", "").lower() == key:
            return name, _check(cfg, name)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"model config {str(path)!r} is not readable JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"model config {str(path)!r} must hold a JSON object, got {type(cfg).__name__}.")
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg = cfg["text_config"]
        default = path.parent.name if path.name == "config.json" else path.stem
        return str(cfg.get("name") or default), _check(cfg, str(path))
    if text.endswith(".json") or text.startswith((".", "/", "~")):
        raise ConfigError(f"model config file {text!r} does not exist.")
    raise ConfigError(f"unknown model {text!r}.{did_you_mean(key, builtin)} Known models: {', '.join(builtin)}; "
                      "or pass a path to a config.json.")


def _check(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"model config {where} lacks {', '.join(missing)} (LlamaConfig field names are expected: "
                          f"{', '.join(_REQUIRED)}, num_key_value_heads, tie_word_embeddings).")
    return cfg


def _dims(config: Any) -> dict[str, int | bool]:
    cfg = config if isinstance(config, dict) else _as_dict(config)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return dict(hidden=hidden, inter=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]),
                heads=heads, kv_heads=kv, head_dim=head_dim, vocab=int(cfg["vocab_size"]),
                tied=bool(cfg.get("tie_word_embeddings", False)),
                attn_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)))


# ------------------------------------------------------------------------------------------ structure
def linear_shapes(config: Any) -> list[tuple[str, int, int]]:
    """``[(module name, d_out, d_in), ...]`` of every decoder projection (q, k, v, o, gate, up, down per layer),
    named as in a transformers ``LlamaForCausalLM``. The LM head is not included."""
    d = _dims(config)
    h, q_out, kv_out, inter = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"], d["inter"]
    out = []
    for i in range(d["layers"]):
        att, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out += [(f"{att}.q_proj", q_out, h), (f"{att}.k_proj", kv_out, h), (f"{att}.v_proj", kv_out, h),
                (f"{att}.o_proj", h, q_out), (f"{mlp}.gate_proj", inter, h), (f"{mlp}.up_proj", inter, h),
                (f"{mlp}.down_proj", h, inter)]
    return out


def base_params(config: Any) -> int:
    """Parameters of the base model: embedding, LM head (unless tied), 2 RMSNorms per layer, final norm,
    projections (and their biases when ``attention_bias`` / ``mlp_bias``)."""
    d = _dims(config)
    shapes = linear_shapes(config)
    n = sum(o * i for _, o, i in shapes)
    for name, o, _ in shapes:
        if (d["attn_bias"] and ".self_attn." in name) or (d["mlp_bias"] and ".mlp." in name):
            n += o
    emb = d["vocab"] * d["hidden"]
    return n + emb * (1 if d["tied"] else 2) + d["hidden"] * (2 * d["layers"] + 1)


def target_shapes(config: Any, method) -> list[tuple[str, int, int]]:
    """The projections a method adapts: all of them (``targets='all-linear'``), or those whose module name
    equals or ends in ``.<entry>`` for an entry of ``targets`` (as :meth:`methods.Method.target_layers`)."""
    shapes = linear_shapes(config)
    targets = method.hp.get("targets", "all-linear")
    if targets == "all-linear":
        return shapes
    targets = [targets] if isinstance(targets, str) else list(targets)
    suffixes = sorted({n.split(".")[-1] for n, _, _ in shapes})
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n, _, _ in shapes):
            raise ConfigError(f"{method.name}: targets entry {t!r} matches no linear layer of the model."
                              f"{did_you_mean(t, suffixes)} Linear layers end in: {', '.join(suffixes)}.")
    return [s for s in shapes if any(s[0] == t or s[0].endswith("." + t) for t in targets)]


def base_flops_per_token(config: Any, seq_len: int = DEFAULT_SEQ_LEN) -> dict[str, int]:
    """Forward matmul FLOPs per token of the base model: ``linear`` (decoder projections), ``lm_head``,
    ``attention`` (QKᵀ and PV at ``seq_len``) and their ``total`` (see the module docstring)."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ConfigError(f"seq_len={seq_len!r} must be a positive integer (tokens per sequence).")
    d = _dims(config)
    lin = 2 * sum(o * i for _, o, i in linear_shapes(config))
    head = 2 * d["vocab"] * d["hidden"]
    attn = 4 * seq_len * d["heads"] * d["head_dim"] * d["layers"]
    return {"linear": lin, "lm_head": head, "attention": attn, "total": lin + head + attn}


# ---------------------------------------------------------------------------------------------- account
def account(model: Any, method: Any, *, seq_len: int = DEFAULT_SEQ_LEN, **hp: Any) -> dict[str, Any]:
    """Exact accounting of ``method`` (a registered name built with ``**hp``, or a built Method) on ``model``.

    Returns a JSON-able dict: ``model``, ``hub_id``, ``method`` (name), ``describe`` (the method's describe()),
    ``deploy``, ``seq_len``, ``base_params``, ``target_params`` (weights of the target layers),
    ``n_target_layers``, ``trainable_params``, ``trainable_percent``, ``adapter_flops_per_token``,
    ``forward_flops_per_token``, ``train_flops_per_token``, ``flops`` (the breakdown), ``bits_per_param``
    (whole deployed model), ``bits_per_param_target`` (target layers only), ``bits_per_param_format``
    (``"deployed"``), the same two in the ``_working`` (fp32 working copies) and ``_gptq`` (GPTQ export, or None)
    formats, ``adapter_bits`` and ``deployed_bytes``. Formulas: module docstring."""
    import methods

    if isinstance(method, str):
        method = methods.from_config({"name": method, **hp})
    elif hp:
        raise ConfigError("hyperparameters are given by the built method; do not pass them again to account().")
    name, cfg = load_config(model)
    d = _dims(cfg)
    targets = target_shapes(cfg, method)
    scheme, g = method.scheme(), method.geometry()
    for lname, o, i in targets:  # the shape checks of prepare(): no count for a model the method cannot prepare
        if scheme is not None:
            scheme.check_layer(lname, o, i)
        if g is not None and (i % g.p or o % g.q):
            raise ShapeError(f"{method.name}: layer {lname} with weight shape (out={o}, in={i}) is not divisible "
                             f"by the adapter's pooling p={g.p} (in) / repeat q={g.q} (out); choose values that "
                             "divide every target layer's width, or exclude the layer with targets=[...].")

    trainable = sum(int(method.layer_trainable_params(n, o, i)) for n, o, i in targets)
    f_ad = sum(int(method.layer_adapter_flops_per_token(n, o, i)) for n, o, i in targets)
    base = base_flops_per_token(cfg, seq_len)
    f_wgrad = 2 * sum(o * i for _, o, i in targets) if method.needs_base_weight_grad and trainable else 0
    forward = base["total"] + f_ad
    backward = (base["linear"] + base["lm_head"] + 2 * base["attention"] + 2 * f_ad + f_wgrad) if trainable else 0
    skip_base = 2 * sum(o * i for _, o, i in linear_shapes(cfg)[:3])  # layer 0's q, k, v

    n_base = base_params(cfg)
    n_target = sum(o * i for _, o, i in targets)
    fp16_deploy = scheme is None or method.deploy == "fp16-merge"

    def bits(fmt: str) -> tuple[float, float] | tuple[None, None]:
        """(whole model, target layers) bits per parameter in the storage format ``fmt``."""
        if not fp16_deploy and fmt not in scheme.bit_formats():
            return None, None
        t = sum((FP16_BITS if fp16_deploy else scheme.stored_bits_per_param(o, i, format=fmt)) * o * i
                for _, o, i in targets)
        return (t + FP16_BITS * (n_base - n_target)) / n_base, t / n_target

    bpp, bpp_target = bits(BITS_FORMAT)
    bpp_working, bpp_target_working = bits("working")
    bpp_gptq, bpp_target_gptq = bits("gptq") if not fp16_deploy else (None, None)
    model_bits = bpp * n_base
    adapter_bits = FP16_BITS * trainable if method.deploy == "4+16" else 0
    return {
        "model": name,
        "hub_id": cfg.get("hub_id"),
        "method": method.name,
        "describe": method.describe(),
        "deploy": method.deploy,
        "seq_len": seq_len,
        "base_params": n_base,
        "target_params": n_target,
        "n_target_layers": len(targets),
        "trainable_params": trainable,
        "trainable_percent": 100.0 * trainable / n_base,
        "accounting_source": method.accounting_source,
        "adapter_flops_per_token": f_ad,
        "forward_flops_per_token": forward,
        "train_flops_per_token": forward + backward,
        "flops": {
            "base_linear": base["linear"], "lm_head": base["lm_head"], "attention": base["attention"],
            "adapter": f_ad, "base_weight_grad": f_wgrad, "forward": forward, "backward": backward,
            "first_layer_input_grad_base": skip_base,
            "formula": "train = 2*(base_linear + lm_head) + 3*attention + 3*adapter + base_weight_grad; "
                       f"attention = 4*seq_len*n_heads*head_dim*n_layers at seq_len={seq_len}",
        },
        "bits_per_param": bpp,
        "bits_per_param_target": bpp_target,
        "bits_per_param_format": BITS_FORMAT,
        "bits_per_param_working": bpp_working,
        "bits_per_param_target_working": bpp_target_working,
        "bits_per_param_gptq": bpp_gptq,
        "bits_per_param_target_gptq": bpp_target_gptq,
        "adapter_bits": adapter_bits,
        "deployed_bytes": (model_bits + adapter_bits) / 8,
        "dims": d,
    }


_BITS_KEYS = ("bits_per_param", "bits_per_param_target", "bits_per_param_format", "bits_per_param_working",
              "bits_per_param_target_working", "bits_per_param_gptq", "bits_per_param_target_gptq",
              "deployed_bytes")


def bits_from_record(acc: dict[str, Any]) -> dict[str, Any]:
    """The bits fields (``bits_per_param*``, ``deployed_bytes``) of a stored accounting record, in the current
    formats: taken as they are when the record has ``bits_per_param_format == "deployed"``, else (a record
    written before the formats were separated, whose ``bits_per_param`` counted the fp32 working copies)
    recomputed by :func:`account` from the record's ``dims``, ``method``, ``describe.hyperparameters`` and
    ``seq_len``. Raises ConfigError when an old record lacks what that needs."""
    if acc.get("bits_per_param_format") == BITS_FORMAT:
        return {k: acc.get(k) for k in _BITS_KEYS}
    d, desc = acc.get("dims"), acc.get("describe")
    if not isinstance(d, dict) or not isinstance(desc, dict) or not acc.get("method"):
        raise ConfigError("accounting record without bits_per_param_format, dims or describe: re-run the "
                          "accounting (qftbench account / the finetune step) to get deployed bits per parameter.")
    cfg = {"hidden_size": d["hidden"], "intermediate_size": d["inter"], "num_hidden_layers": d["layers"],
           "num_attention_heads": d["heads"], "num_key_value_heads": d["kv_heads"], "head_dim": d["head_dim"],
           "vocab_size": d["vocab"], "tie_word_embeddings": d["tied"], "attention_bias": d["attn_bias"],
           "mlp_bias": d["mlp_bias"]}
    fresh = account(cfg, acc["method"], seq_len=acc.get("seq_len", DEFAULT_SEQ_LEN),
                    **(desc.get("hyperparameters") or {}))
    return {k: fresh[k] for k in _BITS_KEYS}
