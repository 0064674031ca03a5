# Evaluation with lm-evaluation-harness, one job per (run, deployment mode, task group).


rule evaluate:
    input:
        f"{RESULTS}/runs/{{run}}/train.json",
    output:
        f"{RESULTS}/runs/{{run}}/eval/{{mode}}/{{group}}.json",
    params:
        py=PY,
        cfg=lambda w: full_json(w.run),
        tasks=lambda w: ",".join(EVALS[(w.run, w.mode, w.group)].tasks),
        shots=lambda w: -1 if EVALS[(w.run, w.mode, w.group)].shots is None else EVALS[(w.run, w.mode, w.group)].shots,
    threads: lambda w: res(w.run, "threads", 1)
    resources:
        mem_mb=lambda w: res(w.run, "eval_mem_mb", res(w.run, "mem_mb")),
        runtime=lambda w: res(w.run, "eval_runtime", res(w.run, "runtime")),
        gpu=lambda w: res(w.run, "gpu", 0),
        cpus_per_task=lambda w: res(w.run, "threads", 1),
        slurm_extra=lambda w: res(w.run, "slurm_extra", ""),
    log:
        f"{RESULTS}/logs/evaluate/{{run}}/{{mode}}/{{group}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{run}}/{{mode}}/{{group}}.tsv"
    shell:
        "{params.py} -m qftbench.cli evaluate --config-json {params.cfg:q} --mode {wildcards.mode:q} "
        "--tasks {params.tasks:q} --num-fewshot {params.shots} --threads {threads} --gpus {resources.gpu} > {log:q} 2>&1"
