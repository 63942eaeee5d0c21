# Entry point for `snakemake` run from the repository root. The workflow itself lives in
# workflow/Snakefile; this file only adds the default target (a bare `include:` would lose it).
include: "workflow/Snakefile"


# A bare `snakemake` builds the config's `targets`. The paper config (config/config.yaml) has none: there a bare
# run only prints how to start; every table is the explicit target `all_tables` (docs/cluster.md). With targets
# the rule runs nothing itself, so a finished run is a no-op.
if config["targets"]:

    rule default:
        default_target: True
        input:
            config["targets"],
        localrule: True

else:

    rule default:
        default_target: True
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
