# Fine-tuning. The only output is train.json, written last by the step: checkpoints live in the scratch
# folder (paths.scratch), which is never a rule output, so Snakemake never deletes what a resume needs. A job
# killed by a time limit or preemption resumes from its last checkpoint when it is retried or rerun.


rule finetune:
    input:
        base=lambda w: f"{RESULTS}/cache/bases/{BASE_OF[w.run]}/base_manifest.json",
    output:
        f"{RESULTS}/runs/{{run}}/train.json",
    params:
        py=PY,
        cfg=lambda w: training_json(w.run),
    threads: lambda w: res(w.run, "threads", 1)
    resources:
        mem_mb=lambda w: res(w.run, "mem_mb"),
        runtime=lambda w: res(w.run, "runtime"),
        gpu=lambda w: res(w.run, "gpu", 0),
        cpus_per_task=lambda w: res(w.run, "threads", 1),
        slurm_extra=lambda w: res(w.run, "slurm_extra", ""),
    log:
        f"{RESULTS}/logs/finetune/{{run}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune/{{run}}.tsv"
    shell:
        "{params.py} -m qftbench.cli finetune --config-json {params.cfg:q} --threads {threads} --gpus {resources.gpu} > {log:q} 2>&1"
