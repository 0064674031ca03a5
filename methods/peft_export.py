"""LoRA-shaped adapters (``lora``, ``qlora``, ``loftq``) as peft adapters that ``PeftModel.from_pretrained`` loads.

The adapter of these methods is exactly peft's LoRA (``p = q = 1``, ``ΔW = (alpha / r) · B·A``), so it is
written in peft's layout: ``adapter_config.json`` (a ``LoraConfig``) and ``adapter_model.safetensors`` with
``base_model.model.<layer>.lora_{A,B}.weight``. Load it onto the method's base: the 16-bit model for ``lora``,
the NF4 model for ``qlora``, and for ``loftq`` the LoftQ base ``Q_T`` (save it with
:func:`methods.base_io.save_quantized_base`; peft's own LoftQ export has the same convention).
"""
from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .adapter import AdapterLinear
from .errors import ConfigError

def lora_shaped() -> list[str]:
    """The registered methods whose adapter is a plain LoRA (their class sets ``peft_exportable``)."""
    from .registry import get, names

    return [n for n in names() if n != "peft" and getattr(get(n), "peft_exportable", False)]


def export_peft_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    import peft

    method = getattr(model, "qft_method", None)
    if method is None or not getattr(method, "peft_exportable", False):
        name = getattr(method, "name", None)
        raise ConfigError(f"export_peft_adapter: only {', '.join(lora_shaped())} adapters are LoRA-shaped (got "
                          f"{name!r}); pooled adapters (qalora, qbara, qahira) have no peft equivalent: use "
                          "methods.save_adapter, or merge.")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}
    suffixes = sorted({n.split(".")[-1] for n in layers})
    cfg = peft.LoraConfig(r=method.hp["rank"], lora_alpha=method.hp["alpha"], lora_dropout=method.hp["dropout"],
                          target_modules=suffixes, bias="none", task_type="CAUSAL_LM",
                          base_model_name_or_path=base_model_name_or_path)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(d))
    tensors = {}
    for n, m in layers.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = m.adapter.A.detach().contiguous().cpu()
        tensors[f"base_model.model.{n}.lora_B.weight"] = m.adapter.B.detach().contiguous().cpu()
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d
