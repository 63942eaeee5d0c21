# Figures: the qualitative grid of paper Fig. 7 and per-category coarse-vs-refined pixel AP bars.


rule figures:
    input:
        unpack(figure_inputs),
        ready=dataset_ready,
    output:
        grid=report(
            "figures/{dataset}/{backend}/{variant}/seed{seed}/qualitative.png",
            caption="../report/qualitative.rst",
            category="Figures",
        ),
        bars=report(
            "figures/{dataset}/{backend}/{variant}/seed{seed}/bars.png",
            caption="../report/bars.rst",
            category="Figures",
        ),
    params:
        cli=ANOREFINER,
        root=lambda wc: dataset_root(wc.dataset),
    log:
        "logs/figures/{dataset}/{backend}/{variant}/seed{seed}.log",
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../envs/anorefiner.yaml"
    shell:
        "({params.cli} figures --kind qualitative --root {params.root} --dataset {wildcards.dataset}"
        " --backend {wildcards.backend} --out {output.grid} {input.refined}"
        " && {params.cli} figures --kind bars --out {output.bars} {input.metrics}) > {log} 2>&1"
