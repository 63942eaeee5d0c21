# Image- and pixel-level metrics per category, as tidy CSV rows.


rule metrics:
    input:
        ready=dataset_ready,
        source=metrics_source,
    output:
        csv="results/metrics/{dataset}/{backend}/{variant}/seed{seed}/{category}.csv",
        # the scored store's provenance (commit, device, weights), collected by the tables (docs/audit.md)
        provenance="results/metrics/{dataset}/{backend}/{variant}/seed{seed}/{category}.provenance.json",
    params:
        cli=ANOREFINER,
        root=lambda wc: dataset_root(wc.dataset),
        options=json.dumps(config["evaluation"], sort_keys=True),
    log:
        "logs/metrics/{dataset}/{backend}/{variant}/seed{seed}/{category}.log",
    benchmark:
        "results/benchmarks/metrics/{dataset}/{backend}/{variant}/seed{seed}/{category}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} metrics --root {params.root} --dataset {wildcards.dataset}"
        " --category {wildcards.category} --backend {wildcards.backend} --variant {wildcards.variant}"
        " --seed {wildcards.seed} --source {input.source} --options '{params.options}'"
        " --out {output.csv} > {log} 2>&1"
