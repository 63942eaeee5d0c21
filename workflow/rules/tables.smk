# Paper tables: reproduced mean/std over seeds beside the published numbers, and the audit.


rule table:
    input:
        metrics=table_inputs,
    output:
        csv=report(
            "tables/{table}.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}", "format": "csv"},
        ),
        md=report(
            "tables/{table}.md",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}", "format": "markdown"},
        ),
        # commit, configuration hash, packages, devices and weights of every row (docs/audit.md)
        provenance="tables/{table}.provenance.json",
    params:
        cli=ANOREFINER,
        tables_dir=config["tables"]["dir"],
        config_json=lambda wc: json.dumps(
            {k: config[k] for k in ("datasets", "tables", "backbones", "backends")}, sort_keys=True
        ),
        config_sha256=CONFIG_SHA256,
    log:
        "logs/tables/{table}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} table --name {wildcards.table} --tables-dir {params.tables_dir}"
        " --config-json '{params.config_json}' --config-sha256 {params.config_sha256}"
        " --out {output.csv} {input.metrics} > {log} 2>&1"


rule audit:
    input:
        csv=lambda wc: [f"tables/{name}.csv" for name in table_names()],
        provenance=lambda wc: [f"tables/{name}.provenance.json" for name in table_names()],
    output:
        report("tables/audit.md", caption="../report/workflow.rst", category="Tables"),
    params:
        cli=ANOREFINER,
        config_json=lambda wc: json.dumps({"tables": config["tables"]}, sort_keys=True),
    log:
        "logs/tables/audit.log",
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "{params.cli} table --audit --config-json '{params.config_json}' --out {output} {input.csv} > {log} 2>&1"
