# Trained CLIP backends: APRIL-GAN's linear adapters, trained on the auxiliary dataset's test split
# (the other dataset: VisA-trained adapters score MVTec AD and vice versa), or the official file.


rule train_backend:
    input:
        ready=train_ready,
    output:
        "results/checkpoints/{backend}/{source}_{dataset}.pt",
    wildcard_constraints:
        source="trained|official",
    params:
        cli=ANOREFINER,
        type=lambda wc: backend_cfg(wc.backend)["type"],
        root=lambda wc: dataset_root(wc.dataset),
        backbone=lambda wc: backend_backbone(wc)["name"],
        resolution=lambda wc: backend_backbone(wc)["resolution"],
        layers=lambda wc: " ".join(backend_backbone(wc).get("layers", [])),
        pretrained=lambda wc: backend_backbone(wc).get("pretrained") or "none",
        activation=lambda wc: activation_arg(backend_cfg(wc.backend)["backbone"]),
        options=train_options,
        official=official_args,
        text_cache=TEXT_CACHE,
        device=config["compute"]["device"],
    log:
        "logs/train_backend/{backend}/{source}_{dataset}.log",
    benchmark:
        "results/benchmarks/train_backend/{backend}/{source}_{dataset}.tsv"
    threads: config["compute"]["threads"]
    resources:
        gpu=gpus,
        mem_mb=24000,
        runtime=360,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} train-backend --backend-type {params.type} --root {params.root} --dataset {wildcards.dataset}"
        " --backbone {params.backbone} --resolution {params.resolution} --layers {params.layers}"
        " --pretrained {params.pretrained} {params.activation} --options '{params.options}'"
        " --text-cache {params.text_cache} {params.official} --device {params.device} --out {output} > {log} 2>&1"
