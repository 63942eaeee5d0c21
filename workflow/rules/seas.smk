# SeaS (AnoRefiner Table 5 (c), docs/seas.md): Stable Diffusion fine-tuned per category on a few real anomaly images
# of each defect type; PGT's variants with synthesis.method "seas" take their pseudo-anomalies from it.


# Both stages of SeaS (generation model, then its mask head) for one category, on a GPU.
rule train_seas:
    input:
        ready=dataset_ready,
        weights=seas_weights_input,
    output:
        directory("results/seas/{dataset}/{category}"),
    params:
        cli=ANOREFINER,
        root=lambda wc: dataset_root(wc.dataset),
        options=seas_options,
        device=device_arg(),
    log:
        "logs/train_seas/{dataset}/{category}.log",
    benchmark:
        "results/benchmarks/train_seas/{dataset}/{category}.tsv"
    threads: config["compute"]["threads"]
    resources:
        gpu=gpus,
        mem_mb=48000,
        runtime=720,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} train-seas --root {params.root} --dataset {wildcards.dataset} --category {wildcards.category}"
        " --weights {input.weights} --options '{params.options}' --device {params.device} --out {output}"
        " > {log} 2>&1"


# The pinned Stable Diffusion commit from the model hub, verified file by file: a local job (network, login node).
rule sd_weights:
    output:
        directory("resources/weights/{model}/{revision}"),
    wildcard_constraints:
        model=r"[A-Za-z0-9_.-]+",
        revision=r"[0-9a-f]{40}",
    params:
        cli=ANOREFINER,
        retries=config["download"]["retries"],
        timeout=config["download"]["timeout_s"],
        backoff=config["download"]["backoff_s"],
    log:
        "logs/weights/{model}/{revision}.log",
    resources:
        mem_mb=4000,
        runtime=240,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} fetch-weights --model {wildcards.model} --pretrained {wildcards.revision} --out {output}"
        " --retries {params.retries} --timeout {params.timeout} --backoff {params.backoff} > {log} 2>&1"
