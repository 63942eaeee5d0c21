# Coarse, patch-level anomaly maps of a zero-shot backend (MuSc, PA-CLIP, APRIL-GAN, or maps you bring).


rule coarse:
    input:
        ready=dataset_ready,
        weights=backend_weights,
        features=features_of,
        byo=byo_maps,
        checkpoint=backend_checkpoint,
    output:
        "results/coarse/{dataset}/{backend}/{category}/seed{seed}.h5",
    params:
        cli=ANOREFINER,
        root=lambda wc: dataset_root(wc.dataset),
        type=lambda wc: backend_cfg(wc.backend)["type"],
        options=lambda wc: backend_options(wc),
        backbone=lambda wc: backend_backbone(wc)["name"],
        resolution=lambda wc: backend_backbone(wc)["resolution"],
        pretrained=lambda wc: pretrained_arg(backend_cfg(wc.backend)["backbone"]),
        activation=lambda wc: activation_arg(backend_cfg(wc.backend)["backbone"]),
        byo=lambda wc, input: f"--byo-maps {input.byo}" if input.byo else "",
        device=device_arg(),
    log:
        "logs/coarse/{dataset}/{backend}/{category}/seed{seed}.log",
    benchmark:
        "results/benchmarks/coarse/{dataset}/{backend}/{category}/seed{seed}.tsv"
    threads: config["compute"]["threads"]
    resources:
        gpu=gpus,
        mem_mb=16000,
        runtime=60,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} coarse --features {input.features} --backend-type {params.type}"
        " --backend-name {wildcards.backend} --options '{params.options}' --seed {wildcards.seed}"
        " --dataset {wildcards.dataset} --category {wildcards.category}"
        " --backbone {params.backbone} --resolution {params.resolution} --pretrained {params.pretrained}"
        " {params.activation}"
        " --data-root {params.root} {params.byo}"
        " --device {params.device} --out {output} > {log} 2>&1"
