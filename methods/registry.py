"""The method registry: one line per method, ``name -> "module:Class"`` (imported lazily).

Adding a method takes one file in ``methods/`` and one line here (README, "Adding a method").
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
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


def names() -> list[str]:
    """Registered method names."""
    return list(REGISTRY)


def register(name: str, target: str | type) -> None:
    """Register a method from outside the package: ``register("mine", "mypkg.mine:Mine")``."""
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
