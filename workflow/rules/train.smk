# Trained CLIP backends: APRIL-GAN's linear adapters, trained on the auxiliary dataset's test split
# (the other dataset: VisA-trained adapters score MVTec AD and vice versa), or the official file; the few-shot
# methods per category (rule train_fewshot, below).


rule train_backend:
    input:
        ready=dataset_ready,
        weights=backend_weights,
    output:
        "results/checkpoints/{backend}/trained_{dataset}.pt",
    params:
        cli=ANOREFINER,
        type=lambda wc: backend_cfg(wc.backend)["type"],
        root=lambda wc: dataset_root(wc.dataset),
        backbone=lambda wc: backend_backbone(wc)["name"],
        resolution=lambda wc: backend_backbone(wc)["resolution"],
        layers=lambda wc: " ".join(backend_backbone(wc).get("layers", [])),
        pretrained=lambda wc: pretrained_arg(backend_cfg(wc.backend)["backbone"]),
        activation=lambda wc: activation_arg(backend_cfg(wc.backend)["backbone"]),
        pos_embed=lambda wc: pos_embed_arg(backend_cfg(wc.backend)["backbone"]),
        options=train_options,
        text_cache=TEXT_CACHE,
        device=device_arg(),
    log:
        "logs/train_backend/{backend}/trained_{dataset}.log",
    benchmark:
        "results/benchmarks/train_backend/{backend}/trained_{dataset}.tsv"
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
        " --pretrained {params.pretrained} {params.activation} {params.pos_embed} --options '{params.options}'"
        " --text-cache {params.text_cache} --device {params.device} --out {output} > {log} 2>&1"


# The official checkpoint (downloaded and verified, or a local file checked): a local job (network, login node).
rule official_checkpoint:
    output:
        "results/checkpoints/{backend}/official_{dataset}.pt",
    params:
        cli=ANOREFINER,
        type=lambda wc: backend_cfg(wc.backend)["type"],
        backbone=lambda wc: backend_backbone(wc)["name"],
        resolution=lambda wc: backend_backbone(wc)["resolution"],
        official=official_args,
    log:
        "logs/official_checkpoint/{backend}/official_{dataset}.log",
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} train-backend --backend-type {params.type} --dataset {wildcards.dataset}"
        " --backbone {params.backbone} --resolution {params.resolution} {params.official}"
        " --out {output} > {log} 2>&1"


# The few-shot methods train per scored category (zsad/registry.py train_scope): PromptAD and MVFA-AD on the k
# train/good shots drawn by the run seed (draw "seed<k>"), RegAD on the dataset's other categories ("others").
rule train_fewshot:
    input:
        ready=dataset_ready,
        weights=backend_weights,
    output:
        "results/checkpoints/{backend}/{dataset}/{category}/trained_{draw}.pt",
    params:
        cli=ANOREFINER,
        type=lambda wc: backend_cfg(wc.backend)["type"],
        root=lambda wc: dataset_root(wc.dataset),
        backbone=lambda wc: backend_backbone(wc)["name"],
        resolution=lambda wc: backend_backbone(wc)["resolution"],
        layers=lambda wc: " ".join(backend_backbone(wc).get("layers", [])),
        pretrained=lambda wc: pretrained_arg(backend_cfg(wc.backend)["backbone"]),
        activation=lambda wc: activation_arg(backend_cfg(wc.backend)["backbone"]),
        options=train_options,
        fewshot=fewshot_args,
        text_cache=TEXT_CACHE,
        device=device_arg(),
    wildcard_constraints:
        draw=r"seed\d+|others",
    log:
        "logs/train_fewshot/{backend}/{dataset}/{category}/trained_{draw}.log",
    benchmark:
        "results/benchmarks/train_fewshot/{backend}/{dataset}/{category}/trained_{draw}.tsv"
    threads: config["compute"]["threads"]
    resources:
        gpu=gpus,
        mem_mb=24000,
        runtime=120,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} train-backend --backend-type {params.type} --root {params.root} --dataset {wildcards.dataset}"
        " {params.fewshot} --backbone {params.backbone} --resolution {params.resolution} --layers {params.layers}"
        " --pretrained {params.pretrained} {params.activation} --options '{params.options}'"
        " --text-cache {params.text_cache} --device {params.device} --out {output} > {log} 2>&1"
