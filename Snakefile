# Entry point for `snakemake` run from the repository root. The workflow itself lives in
# workflow/Snakefile; this file only adds the default target (a bare `include:` would lose it).
include: "workflow/Snakefile"


# A bare `snakemake` builds the config's `targets`: none in the paper config (config/config.yaml), where
# it only prints how to start; every table is the explicit target `all_tables` (docs/cluster.md).
rule default:
    default_target: True
    input:
        config["targets"],
    params:
        text=default_message(),
    log:
        "logs/default.log",
    localrule: True
    conda:
        "workflow/envs/anorefiner.yaml"
    shell:
        "printf '%s\\n' {params.text} | tee {log}"


# Every paper table and the audit: an explicit target (`snakemake all_tables`), never the default.
rule all_tables:
    input:
        "tables/audit.md",
    localrule: True
