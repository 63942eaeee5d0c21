# Entry point for `snakemake` run from the repository root. The workflow itself lives in
# workflow/Snakefile; this file only adds the default target (a bare `include:` would lose it).
include: "workflow/Snakefile"


rule default:
    default_target: True
    input:
        config["targets"],
