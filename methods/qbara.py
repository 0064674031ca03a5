"""``qbara`` (Q-BaRA, arXiv 2407.17029; Q-BLoRA in v2): NF4 base + a balanced-rank adapter.

Input pooled by ``k``, output repeated ``k`` times, inner rank ``k·r``: the same trainable parameters as
LoRA, ``r·(D_in + D_out)``, for any ``k``. The released code fixes ``k = 2``. Deployed as NF4 + adapter,
or merged to fp16.
"""
from .base import ALPHA, DROPOUT, INIT_LOWRANK, RANK, SEED, TARGETS, Geometry, Hyper, Method
from .quant.scheme import QuantScheme


class QBaRA(Method):
    name = "qbara"
    label = "Q-BaRA"
    plot_style = ("#d62728", "v")  # (colour, marker) in the figures
    summary = "NF4 + double quantization + adapter with pool k, repeat k, inner rank k·r"
    deploy = "4+16"
    hyperparameters = {
        "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT,
        "bits": Hyper(4, int, "bits of the NF4 base (bitsandbytes)", choices=(4,)),
        "k": Hyper(2, int, "balance factor: pool k, repeat k, inner rank k·r (released code: 2)", minimum=1),
        "init": INIT_LOWRANK,
        "targets": TARGETS, "seed": SEED,
    }

    def scheme(self):
        return QuantScheme(kind="bnb-nf4", bits=4, blocksize=64)

    def geometry(self):
        k = self.hp["k"]
        return Geometry(p=k, q=k, rank=k * self.hp["rank"], init=self.hp["init"])

    def _p_field(self):
        return "k"
