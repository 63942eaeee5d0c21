# Test-time-adaptation baselines of Table 1 (TIPI, SAR, DeYO): a backend of type `tta` adapts its
# `base` backend's CLIP tower group by group and writes a coarse store like any backend, so metrics,
# tables and PGT read it unchanged. Its store has the coarse rule's path: `ruleorder` gives it here.


ruleorder: tta > coarse


rule tta:
    input:
        ready=dataset_ready,
        weights=backend_weights,
        checkpoint=tta_base_checkpoint,
    output:
        "results/coarse/{dataset}/{backend}/{category}/seed{seed}.h5",
    wildcard_constraints:
        backend=tta_backend_pattern(),
    params:
        cli=ANOREFINER,
        root=lambda wc: dataset_root(wc.dataset),
        method=lambda wc: backend_cfg(wc.backend)["method"],
        base=tta_base,
        base_type=lambda wc: backend_cfg(tta_base(wc))["type"],
        base_options=tta_base_options,
        options=tta_options,
        backbone=lambda wc: backend_backbone(wc)["name"],
        resolution=lambda wc: backend_backbone(wc)["resolution"],
        layers=lambda wc: " ".join(backend_backbone(wc).get("layers", [])),
        pretrained=lambda wc: pretrained_arg(backend_cfg(wc.backend)["backbone"]),
        activation=lambda wc: activation_arg(backend_cfg(wc.backend)["backbone"]),
        pos_embed=lambda wc: pos_embed_arg(backend_cfg(wc.backend)["backbone"]),
        device=device_arg(),
    log:
        "logs/tta/{dataset}/{backend}/{category}/seed{seed}.log",
    benchmark:
        "results/benchmarks/tta/{dataset}/{backend}/{category}/seed{seed}.tsv"
    threads: config["compute"]["threads"]
    resources:
        gpu=gpus,
        mem_mb=32000,
        runtime=120,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} tta --root {params.root} --dataset {wildcards.dataset} --category {wildcards.category}"
        " --method {params.method} --base-type {params.base_type} --base-name {params.base}"
        " --base-options '{params.base_options}' --options '{params.options}'"
        " --backbone {params.backbone} --resolution {params.resolution} --layers {params.layers}"
        " --pretrained {params.pretrained} {params.activation} {params.pos_embed} --seed {wildcards.seed}"
        " --backend-name {wildcards.backend} --device {params.device} --out {output} > {log} 2>&1"
