"""``qlora`` (Dettmers et al. 2023): NF4 base with double quantization through bitsandbytes + LoRA.

``bits: 3 | 2`` puts the same adapter on the own NF3 / NF2 codebook base (block 64, no double quantization): the
"QLoRA" rows of LoftQ's 2- and 3-bit tables, the baseline of its claim. Deployed as "4+16" (NF4 base + 16-bit adapter); :meth:`merge` gives the fp16 model that the
"QLoRA w/ GPTQ" rows re-quantize.
"""
from .base import ALPHA, DROPOUT, INIT_LOWRANK, RANK, SEED, TARGETS, Geometry, Hyper, Method
from .quant.scheme import QuantScheme


class QLoRA(Method):
    name = "qlora"
    label = "QLoRA"
    peft_exportable = True  # a plain LoRA adapter: methods.export_peft_adapter writes it for peft
    plot_style = ("#ff7f0e", "s")  # (colour, marker) in the figures
    paper_rows = {"QLoRA": "4+16", "QLoRA (NF4+DQ)": "4+16", "QLoRA w/ GPTQ": "requant"}  # published rows it reproduces -> mode
    summary = "NF4 + double quantization (bitsandbytes, block 64) + LoRA B·A; deployed 4+16"
    deploy = "4+16"
    hyperparameters = {
        "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT,
        "bits": Hyper(4, int, "bits of the NF base: 4 is bitsandbytes' NF4 + DQ (the paper); 3 and 2 the own "
                      "NF3/NF2 codebook quantizer, block 64 (LoftQ's 'QLoRA' rows at 3 and 2 bits)",
                      choices=(4, 3, 2)),
        "init": INIT_LOWRANK,
        "targets": TARGETS, "seed": SEED,
    }

    def scheme(self):
        if self.hp["bits"] != 4:  # LoftQ's baseline: QLoRA's initialisation (B = 0) on an NF3/NF2 base
            return QuantScheme(kind="nf", bits=self.hp["bits"], blocksize=64)
        return QuantScheme(kind="bnb-nf4", bits=4, blocksize=64)

    def geometry(self):
        return Geometry(p=1, q=1, rank=self.hp["rank"], init=self.hp["init"])
