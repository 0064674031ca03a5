"""``lora``: the 16-bit LoRA baseline (Hu et al. 2021): frozen bf16/fp16 base, ``ΔW = s·B·A``, fp16 merge."""
from .base import ALPHA, DROPOUT, INIT_LOWRANK, RANK, SEED, TARGETS, Geometry, Hyper, Method


class LoRA(Method):
    name = "lora"
    label = "LoRA (16-bit)"
    peft_exportable = True  # a plain LoRA adapter: methods.export_peft_adapter writes it for peft
    plot_style = ("#1f77b4", "o")  # (colour, marker) in the figures
    paper_rows = {"LoRA (BF16 base)": "fp16-merge", "LoRA 16-bit": "fp16-merge"}  # published rows it reproduces -> mode
    summary = "16-bit base (not quantized) + LoRA B·A; merged to fp16"
    deploy = "fp16-merge"
    hyperparameters = {
        "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT,
        "bits": Hyper(16, int, "bits of the frozen base: lora keeps it in 16 bits (use qlora for NF4)",
                      choices=(16,)),
        "init": INIT_LOWRANK,
        "targets": TARGETS, "seed": SEED,
    }

    def geometry(self):
        return Geometry(p=1, q=1, rank=self.hp["rank"], init=self.hp["init"])
