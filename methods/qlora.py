"""``qlora`` (Dettmers et al. 2023): NF4 base with double quantization through bitsandbytes + LoRA.

Deployed as "4+16" (NF4 base + 16-bit adapter); :meth:`merge` gives the fp16 model that the
"QLoRA w/ GPTQ" rows re-quantize.
"""
from .base import ALPHA, DROPOUT, INIT_LOWRANK, RANK, SEED, TARGETS, Geometry, Hyper, Method
from .quant.scheme import QuantScheme


class QLoRA(Method):
    name = "qlora"
    summary = "NF4 + double quantization (bitsandbytes, block 64) + LoRA B·A; deployed 4+16"
    deploy = "4+16"
    hyperparameters = {
        "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT,
        "bits": Hyper(4, int, "bits of the NF4 base (bitsandbytes supports 4 only; loftq offers NF2/NF3)",
                      choices=(4,)),
        "init": INIT_LOWRANK,
        "targets": TARGETS, "seed": SEED,
    }

    def scheme(self):
        return QuantScheme(kind="bnb-nf4", bits=4, blocksize=64)

    def geometry(self):
        return Geometry(p=1, q=1, rank=self.hp["rank"], init=self.hp["init"])
