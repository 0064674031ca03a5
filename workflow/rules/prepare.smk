# The quantized base of a (model, quantizer, bits, group[, calibration]) is computed once and shared by every
# run that needs it (methods/base_io.py). The job's config is the base's spec alone (qftbench.pipeline.base_spec):
# the same in every sweep that shares the base. Each run's own jobs make its data.


rule quantize_base:
    output:
        f"{RESULTS}/cache/bases/{{base}}/base_manifest.json",
    params:
        py=PY,
        cfg=lambda w: base_json(w.base),
    threads: lambda w: res(BASES[w.base], "threads", 1)
    resources:
        mem_mb=lambda w: res(BASES[w.base], "mem_mb"),
        runtime=lambda w: res(BASES[w.base], "quantize_runtime", res(BASES[w.base], "runtime")),
        gpu=lambda w: res(BASES[w.base], "gpu", 0),
        cpus_per_task=lambda w: res(BASES[w.base], "threads", 1),
    log:
        f"{RESULTS}/logs/quantize_base/{{base}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/quantize_base/{{base}}.tsv"
    shell:
        "{params.py} -m qftbench.cli prepare --base-only --config-json {params.cfg:q} --threads {threads} --gpus {resources.gpu} > {log:q} 2>&1"
