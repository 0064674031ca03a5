# qftbench: fine-tune quantized LLMs with every method over a grid, evaluate with lm-eval, collate tables and
# figures beside the published numbers.
#
#   snakemake --cores 2                                    # the embedded default (config/default.yaml)
#   snakemake --cores 8 --configfile config/paper.yaml     # any other sweep config
#   snakemake --workflow-profile workflow/profiles/slurm --configfile config/paper.yaml   # on a SLURM cluster
#   snakemake --report report.html --configfile config/tiny.yaml   # after a run: one browsable HTML file
#
# The sweep config is validated (schema, every method's hyperparameters, incompatible combinations) when this
# file is parsed, before any job starts. Rules are thin: each calls one `qftbench` step (qftbench/pipeline.py).


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
