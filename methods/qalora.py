"""``qalora`` (Xu et al. 2023, QA-LoRA): INTk group-wise base, adapter input pooled over each group.

``p = group_size``, ``q = 1``, ``M = B·A``: the update is constant on every quantization group, so it merges
exactly into the zero points. Pooling scale: ``mean`` (official code, default) or ``sum`` (the paper's
formula). Base quantizer: ``rtn`` (default here: no data needed) or ``gptq`` (the paper; pass calibration).
"""
from .base import ALPHA, DROPOUT, GPTQ_GROUPS, POOL, QUANTIZER, RANK, SEED, TARGETS, Geometry, Hyper, Method
from .intmerge import IntMergeMixin
from .quant.scheme import QuantScheme


class QALoRA(IntMergeMixin, Method):
    name = "qalora"
    label = "QA-LoRA"
    plot_style = ("#9467bd", "D")  # (colour, marker) in the figures
    paper_rows = {"QA-LoRA": "int-merge"}  # published rows it reproduces -> mode
    summary = "INTk base (groups of g along the input) + group-pooled LoRA; exact merge into zero points"
    hyperparameters = {
        "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT,
        "bits": Hyper(4, int, "bits of the INT base", choices=(2, 3, 4, 8)),
        "group_size": Hyper(32, int, "quantization group g along the input; also the pooling p", minimum=1),
        "init": Hyper("xavier", str, "init of A (B = 0); the official code uses xavier-uniform",
                      choices=("xavier", "kaiming", "gaussian")),
        "pool": POOL, "quantizer": QUANTIZER, "gptq_groups": GPTQ_GROUPS, "targets": TARGETS, "seed": SEED,
    }

    def scheme(self):
        return QuantScheme(kind="int", bits=self.hp["bits"], group_size=self.hp["group_size"])

    def geometry(self):
        return Geometry(p=self.hp["group_size"], q=1, rank=self.hp["rank"], init=self.hp["init"],
                        pool=self.hp["pool"])
