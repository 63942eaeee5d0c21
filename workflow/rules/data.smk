# Datasets: download (resumable, SHA-256 verified, safely extracted) or the offline demo generator.


rule download:
    output:
        marker="resources/datasets/{dataset}/.complete",
    params:
        cli=ANOREFINER,
        url=lambda wc: dataset_cfg(wc.dataset).get("url") or "",
        sha256=lambda wc: dataset_cfg(wc.dataset).get("sha256") or "",
        archive=lambda wc: dataset_cfg(wc.dataset).get("archive") or "",
        retries=config["download"]["retries"],
        timeout=config["download"]["timeout_s"],
        backoff=config["download"]["backoff_s"],
    wildcard_constraints:
        dataset="mvtec_ad|visa|dtd",
    log:
        "logs/download/{dataset}.log",
    resources:
        mem_mb=2000,
        runtime=240,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} download --dataset {wildcards.dataset} --dest resources/datasets/{wildcards.dataset}"
        " --downloads resources/downloads/{wildcards.dataset}"
        " --url '{params.url}' --sha256 '{params.sha256}' --archive '{params.archive}'"
        " --retries {params.retries} --timeout {params.timeout} --backoff {params.backoff} > {log} 2>&1"


rule demo_data:
    output:
        marker="resources/datasets/demo/.complete",
    params:
        cli=ANOREFINER,
        categories=lambda wc: " ".join(dataset_cfg("demo")["categories"]),
        generator=lambda wc: " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in dataset_cfg("demo").get("generator", {}).items()
        ),
    log:
        "logs/demo_data.log",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} demo-data --out resources/datasets/demo --categories {params.categories}"
        " {params.generator} > {log} 2>&1"


# Pretrained backbone weights (open_clip / torchvision files), fetched once, SHA-256 verified, into the cache
# compute jobs read offline (backbones/weights.py): a local job (network, login node).
rule weights:
    output:
        "resources/weights/{model}/{tag}.safetensors",
    wildcard_constraints:
        model=r"[A-Za-z0-9_.-]+",
        tag=r"[A-Za-z0-9_.-]+",
    params:
        cli=ANOREFINER,
        source=weights_source,
        retries=config["download"]["retries"],
        timeout=config["download"]["timeout_s"],
        backoff=config["download"]["backoff_s"],
    log:
        "logs/weights/{model}/{tag}.log",
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} fetch-weights {params.source} --out {output}"
        " --retries {params.retries} --timeout {params.timeout} --backoff {params.backoff} > {log} 2>&1"
