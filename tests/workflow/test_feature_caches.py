"""Feature-cache folders name the position-embedding resize: MuSc's rows never read APRIL-GAN's cache (default config)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def test_musc_rows_extract_and_read_their_own_plain_bicubic_cache():
    targets = ["results/refined/mvtec_ad/musc_star/default/seed0/bottle.h5",  # MuSc* and PGT on its maps
               "results/coarse/mvtec_ad/musc_star_tipi/bottle/seed0.h5",
               "results/coarse/mvtec_ad/april_gan/bottle/seed0.h5"]
    cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "--workflow-profile", "none", "--cores", "1", *targets]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shell = [line for line in proc.stdout.splitlines() if "-m anorefiner " in line]

    def command(sub, out):
        found = [line for line in shell if f"-m anorefiner {sub} " in line and f"--out {out}" in line]
        assert len(found) == 1, (sub, out, shell)
        return found[0]

    musc_cache = "results/features/mvtec_ad/vit_l14_336_musc@518-bicubic_no_antialias/bottle.h5"
    april_cache = "results/features/mvtec_ad/vit_l14_336@518/bottle.h5"
    assert "--pos-embed bicubic_no_antialias" in command("features", musc_cache)
    assert "--pos-embed" not in command("features", april_cache)  # the antialiased default
    assert f"--features {musc_cache}" in command("coarse", "results/coarse/mvtec_ad/musc_star/bottle/seed0.h5")
    assert f"--features {musc_cache}" in command("pgt", targets[0])
    assert "--pos-embed bicubic_no_antialias" in command("tta", targets[1])
    assert f"--features {april_cache}" in command("coarse", targets[2])
    assert not any("vit_l14_336@518/" in line for line in shell if "musc" in line)
