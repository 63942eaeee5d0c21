"""Which seed's coarse maps a PGT run reads: its own for a seed-dependent backend, also when the dependence comes
from the preset the backend is named after (``musc_star``: groups of 30 drawn with the seed), which the pgt stage
checks (stages.check_coarse_seed)."""

from __future__ import annotations

from .conftest import snakemake, write_config


def test_a_backend_named_after_a_seeded_preset_refines_the_coarse_maps_of_its_own_seed(tmp_path):
    backends = {"musc_star": {"type": "musc", "backbone": "effnet", "options": {"rscin": False}},  # preset: groups
                "musc": {"type": "musc", "backbone": "effnet", "options": {"group_size": None, "rscin": False}}}
    cfg = write_config(tmp_path, backends=backends)
    targets = [f"results/refined/demo/{b}/default/seed1/widget.h5" for b in backends]
    proc = snakemake(tmp_path, cfg, "-n", "-p", *targets)
    pgt = {b: [line for line in proc.stdout.splitlines() if "-m anorefiner pgt " in line and f"--out {t}" in line]
           for b, t in zip(backends, targets)}
    assert len(pgt["musc_star"]) == 1 and len(pgt["musc"]) == 1, proc.stdout[-3000:]
    assert "--coarse results/coarse/demo/musc_star/widget/seed1.h5" in pgt["musc_star"][0]
    assert "--coarse results/coarse/demo/musc/widget/seed0.h5" in pgt["musc"][0]  # seed-free: computed once
