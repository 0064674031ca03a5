"""qftbench's method library: quantizers, the pooled-adapter family and every method, without Snakemake.

    import methods
    methods.names()                                   # registered method names
    m = methods.build("qalora", rank=64, alpha=16, bits=4, group_size=32)
    model = m.prepare(model)   # quantize the base, inject adapters (every nn.Linear except lm_head)
    merged = m.merge(model)    # exact INT merge for qalora/qahira/peqa, fp16 otherwise

See ``../shared/docs/METHODS.md`` (copied to ``docs/METHODS.md``) for every formula and choice.
"""
from .adapter import AdapterLinear, PooledAdapter, disabled_adapters
from .base import Geometry, Hyper, Method, count_trainable
from .errors import ConfigError, QFTError, ShapeError
from .adapter_io import adapter_state_dict, load_adapter, save_adapter
from .registry import REGISTRY, build, from_config, get, load_plugins, names, register

__all__ = [
    "AdapterLinear", "PooledAdapter", "disabled_adapters", "Geometry", "Hyper", "Method", "count_trainable",
    "ConfigError", "QFTError", "ShapeError", "adapter_state_dict", "load_adapter", "save_adapter",
    "REGISTRY", "build", "from_config", "get", "load_plugins", "names", "register",
]
