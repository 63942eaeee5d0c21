# Progressive group-wise test-time training (PGT) of the Anomaly Refinement Decoder, per category.


rule pgt:
    input:
        ready=dataset_ready,
        weights=backend_weights,
        textures=textures_ready,
        features=features_of,
        coarse=coarse_of,
        seas=seas_inputs,
    output:
        "results/refined/{dataset}/{backend}/{variant}/seed{seed}/{category}.h5",
    params:
        cli=ANOREFINER,
        root=lambda wc: dataset_root(wc.dataset),
        backbone=lambda wc: backend_backbone(wc)["name"],
        pretrained=lambda wc: pretrained_arg(backend_cfg(wc.backend)["backbone"]),
        resolution=lambda wc: backend_backbone(wc)["resolution"],
        backend_type=lambda wc: backend_cfg(wc.backend)["type"],
        backend_options=lambda wc: backend_options(wc),
        options=lambda wc: variant_options(wc),
        textures=textures_arg(),
        eval_resolution=config["refine"]["eval_resolution"],
        device=device_arg(),
        seas=seas_arg,
    log:
        "logs/pgt/{dataset}/{backend}/{variant}/seed{seed}/{category}.log",
    benchmark:
        "results/benchmarks/pgt/{dataset}/{backend}/{variant}/seed{seed}/{category}.tsv"
    threads: config["compute"]["threads"]
    resources:
        gpu=gpus,
        mem_mb=16000,
        runtime=120,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} pgt --root {params.root} --dataset {wildcards.dataset} --category {wildcards.category}"
        " --features {input.features} --coarse {input.coarse} --backbone {params.backbone}"
        " --pretrained {params.pretrained} --resolution {params.resolution}"
        " --backend-type {params.backend_type} --backend-name {wildcards.backend}"
        " --backend-options '{params.backend_options}'"
        " --options '{params.options}' --seed {wildcards.seed} --textures {params.textures}"
        " --eval-resolution {params.eval_resolution} --device {params.device} {params.seas} --out {output}"
        " > {log} 2>&1"
