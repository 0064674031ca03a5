"""The method registry: one line per method, ``name -> "module:Class"`` (imported lazily).

Adding a method takes one file in ``methods/`` and one line here (README, "Adding a method").
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, did_you_mean

#: in the order the tables list the methods (after the un-tuned base): the papers' chronology
REGISTRY: dict[str, str] = {
    "lora": "methods.lora:LoRA",
    "qlora": "methods.qlora:QLoRA",
    "loftq": "methods.loftq:LoftQ",
    "qbara": "methods.qbara:QBaRA",
    "qalora": "methods.qalora:QALoRA",
    "qahira": "methods.qahira:QAHiRA",
    "qahira-ref": "methods.qahira:QAHiRARef",
    "peqa": "methods.peqa:PEQA",
    "base": "methods.untuned:Base",
    "peft": "methods.peft_method:Peft",
}

#: the methods this package ships (the rest were registered by a plugin, see :func:`load_plugins`)
BUILTIN = frozenset(REGISTRY)


def names() -> list[str]:
    """Registered method names."""
    return list(REGISTRY)


def register(name: str, target: str | type) -> None:
    """Register a method from outside the package: ``register("mine", "mypkg.mine:Mine")``, or
    ``register("mine", Mine)`` as the last line of the module that defines ``Mine`` (a plugin: a sweep's or run
    config's ``plugins:`` list names that module so that every job process imports it, :func:`load_plugins`)."""
    if name in BUILTIN:
        raise ConfigError(f"register: {name!r} is one of the suite's own methods; give your method another name.")
    REGISTRY[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def get(name: str) -> type:
    """The method class registered under ``name``."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}.{did_you_mean(name, REGISTRY)} "
                          f"Registered methods: {', '.join(REGISTRY)}.")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def find(name: Any) -> type | None:
    """The method class registered under ``name``, or None (a table name such as ``peft-dora-nf4``, a method
    registered in another process): for consumers that fall back to a default instead of failing."""
    return get(name) if isinstance(name, str) and name in REGISTRY else None


def build(name: str, **hyperparameters: Any):
    """Build a method: ``build("qalora", rank=64, alpha=16, bits=4, group_size=32)``."""
    return get(name)(**hyperparameters)


def from_config(section: Mapping[str, Any]):
    """The Method of a run config's ``method`` section, ``{"name": "qalora", "rank": 64, ...}``: the one place
    the suite builds a Method from a config (the sweep's checks, the pipeline's steps, the accounting, the
    adapter records all call this)."""
    if not isinstance(section, Mapping) or "name" not in section:
        raise ConfigError(f"method: {section!r} has no name; write method: {{name: <one of {', '.join(REGISTRY)}>, "
                          "...hyperparameters}.")
    return build(section["name"], **{k: v for k, v in section.items() if k != "name"})


_LOADED: dict[str, str] = {}  # module name, or a .py file's absolute path -> the module's name


def load_plugins(specs: Sequence[str] | None, where: str = "plugins") -> list[str]:
    """Import the modules that register methods of one's own (``methods.register(...)`` when imported): each
    entry is a module name on ``sys.path`` (``mylab.methods``) or a path to a ``.py`` file, relative to the
    working directory (``my_methods/peqa2.py``). A sweep's ``plugins:`` list reaches every run config and so every
    job process (Snakemake runs each step in a process of its own). Each module is imported once per process;
    returns the module names. Raises :class:`ConfigError` naming the entry and the fix."""
    out = []
    for i, spec in enumerate(specs or ()):
        if not isinstance(spec, str) or not spec:
            raise ConfigError(f"{where}[{i}]={spec!r} is not a module name or a .py file path.")
        path = Path(spec).resolve() if spec.endswith(".py") else None  # (a relative path: from today's folder)
        key = str(path) if path is not None else spec
        if key in _LOADED:
            out.append(_LOADED[key])
            continue
        try:
            if path is not None:
                if not path.is_file():
                    raise ConfigError(f"{where}[{i}]: the file {spec!r} does not exist (looked for {path}). Fix: give "
                                      f"the path relative to the folder you run from, or an importable module name.")
                name = f"qftbench_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
                if name not in sys.modules:
                    module_spec = importlib.util.spec_from_file_location(name, path)
                    module = importlib.util.module_from_spec(module_spec)
                    sys.modules[name] = module  # before executing it: register() records module:Class by name
                    try:
                        module_spec.loader.exec_module(module)
                    except BaseException:
                        sys.modules.pop(name, None)
                        raise
            else:
                name = importlib.import_module(spec).__name__
        except ConfigError:
            raise
        except ImportError as e:
            raise ConfigError(f"{where}[{i}]: cannot import {spec!r}: {e}. Fix: a module on sys.path (PYTHONPATH) "
                              f"or a path to a .py file.") from None
        except Exception as e:
            raise ConfigError(f"{where}[{i}]: importing {spec!r} failed: {type(e).__name__}: {e}") from e
        _LOADED[key] = name
        out.append(name)
    return out
