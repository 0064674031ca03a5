"""``qahira`` and ``qahira-ref`` (QA-HiRA, arXiv 2407.17029; QA-BLoRA in v2): one trainable entry per block.

``M = H`` (one full matrix, no rank): every quantization block of the INTk base gets one trainable value, so
the update merges exactly into the zero points. The scaling keeps the nominal ``s = alpha / rank`` of the
reference code (``rank`` does not change any shape).

* ``qahira`` (default reading): row groups of ``g = 32`` along the input, ``p = g``, ``q = 1``,
  ``H: (D_out, D_in/g)``, ``H = 0`` at init (choice; ``init='kaiming'`` gives the released code's init).
* ``qahira-ref`` (released-code reading): 2-D blocks of 8 (out) x 4 (in), ``p = 4``, ``q = 8``,
  ``H: (D_out/8, D_in/4)``, kaiming-uniform init (a non-zero update at step 0).

Both have ``D_in·D_out/32`` trainable parameters per layer.
"""
from .base import ALPHA, DROPOUT, GPTQ_GROUPS, POOL, QUANTIZER, SEED, TARGETS, Geometry, Hyper, Method
from .intmerge import IntMergeMixin
from .quant.scheme import QuantScheme

BITS = Hyper(4, int, "bits of the INT base", choices=(2, 3, 4, 8))


class QAHiRA(IntMergeMixin, Method):
    name = "qahira"
    label = "QA-HiRA"
    plot_style = ("#8c564b", "P")  # (colour, marker) in the figures
    summary = "INTk base (groups of g) + one trainable entry per group (H); exact merge into zero points"
    not_grid_axes = ("rank",)
    hyperparameters = {
        "rank": Hyper(64, int, "nominal rank, used only in the scaling s = alpha / rank", minimum=1),
        "alpha": ALPHA, "dropout": DROPOUT, "bits": BITS,
        "group_size": Hyper(32, int, "quantization group g along the input; also the pooling p", minimum=1),
        "init": Hyper("zeros", str, "init of H: zeros (default reading) or kaiming (released code)",
                      choices=("zeros", "kaiming")),
        "pool": POOL, "quantizer": QUANTIZER, "gptq_groups": GPTQ_GROUPS, "targets": TARGETS, "seed": SEED,
    }

    def scheme(self):
        return QuantScheme(kind="int", bits=self.hp["bits"], group_size=self.hp["group_size"])

    def geometry(self):
        return Geometry(p=self.hp["group_size"], q=1, rank=None, init=self.hp["init"], pool=self.hp["pool"])


class QAHiRARef(IntMergeMixin, Method):
    name = "qahira-ref"
    label = "QA-HiRA (ref)"
    plot_style = ("#e377c2", "p")  # (colour, marker) in the figures
    summary = "released-code reading of QA-HiRA: INTk base in 8x4 tiles, p=4, q=8, H, kaiming init"
    TILE = (8, 4)
    not_grid_axes = ("rank",)
    hyperparameters = {
        "rank": Hyper(64, int, "nominal rank, used only in the scaling s = alpha / rank", minimum=1),
        "alpha": ALPHA, "dropout": DROPOUT, "bits": BITS,
        "init": Hyper("kaiming", str, "init of H: kaiming (released code) or zeros", choices=("kaiming", "zeros")),
        "pool": POOL, "quantizer": QUANTIZER, "gptq_groups": GPTQ_GROUPS, "targets": TARGETS, "seed": SEED,
    }

    def scheme(self):
        return QuantScheme(kind="int", bits=self.hp["bits"], tile=self.TILE)

    def geometry(self):
        return Geometry(p=self.TILE[1], q=self.TILE[0], rank=None, init=self.hp["init"], pool=self.hp["pool"])

    def _p_field(self):
        return "the 8x4 tile"
