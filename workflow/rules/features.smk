# ViT/CNN features, computed once per (dataset, category, backbone, resolution, position-embedding resize) into
# HDF5 (common.smk feature_dir: the resize is in the folder name unless it is the default).


rule features:
    input:
        ready=dataset_ready,
        weights=features_weights,
    output:
        "results/features/{dataset}/{backbone}@{res}{resize}/{category}.h5",
    params:
        cli=ANOREFINER,
        root=lambda wc: dataset_root(wc.dataset),
        name=lambda wc: backbone_cfg(wc.backbone)["name"],
        pretrained=lambda wc: pretrained_arg(wc.backbone),
        layers=lambda wc: " ".join(backbone_cfg(wc.backbone).get("layers", [])),
        activation=lambda wc: activation_arg(wc.backbone),
        resize=resize_arg,
        batch_size=config["features"]["batch_size"],
        dtype=config["features"]["dtype"],
        compression=config["features"]["compression"],
        device=device_arg(),
    log:
        "logs/features/{dataset}/{backbone}@{res}{resize}/{category}.log",
    benchmark:
        "results/benchmarks/features/{dataset}/{backbone}@{res}{resize}/{category}.tsv"
    threads: config["compute"]["threads"]
    resources:
        gpu=gpus,
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} features --root {params.root} --dataset {wildcards.dataset}"
        " --category {wildcards.category} --backbone {params.name} --resolution {wildcards.res}"
        " --layers {params.layers} --pretrained {params.pretrained} {params.activation} {params.resize}"
        " --batch-size {params.batch_size} --dtype {params.dtype} --compression {params.compression} --device {params.device}"
        " --out {output} > {log} 2>&1"
