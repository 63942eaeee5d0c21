"""Provenance on the tables and the audit (issue 30): real hand-made coarse stores and checkpoints, their
metric sidecars, the rendered columns, the mixed-provenance flags, the table block and the audit section."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import anorefiner

from anorefiner import provenance as prov
from anorefiner.stages import stored_attrs
from anorefiner.tables.audit import audit_markdown, read_blocks, read_rendered, write_audit
from anorefiner.tables.declare import load_declaration
from anorefiner.tables.provenance import MIXED, NOT_RECORDED, read_block, table_block
from anorefiner.tables.render import load_metrics, render_table, write_table
from anorefiner.zsad.store import write_coarse

from .test_render import TABLES_DIR, flat, write_run

REPO = Path(__file__).resolve().parents[3]
HEX40 = re.compile(r"\b[0-9a-f]{40}\b")
CONFIG = {"datasets": {"demo": {"categories": ["tiles", "widget"]}},
          "tables": {"seeds": [0, 1], "datasets": {"MVTec AD": "demo"}}}


def code(commit: str, dirty: bool = False) -> dict:
    return {"version": "0.1.0", "commit": commit, "dirty": dirty}


def scored_run(root: Path, backend: str, seed: int, category: str, value: float, *, weights: str = "imagenet",
               commit: str | None = None, variant: str = "coarse") -> Path:
    """A coarse store recording ``weights`` and a run record (``commit`` replaces the real code state), and its
    metric CSV with the sidecar the metrics stage writes."""
    store = root / "coarse" / backend / category / f"seed{seed}.h5"
    run = prov.run_record("cpu", {"seed": seed})
    if commit is not None:
        run["code"] = code(commit)
    write_coarse(store, ["a", "b"], np.zeros((2, 2, 2)), np.zeros(2),
                 {"run": run, "weights": prov.weight_source(weights)})
    csv = write_run(root / "metrics", "demo", backend, variant, seed, category, {"coarse" if variant == "coarse" else "combined": flat(value)})
    sidecar = prov.write_metrics_provenance(csv, store, stored_attrs(store))
    if commit is not None:  # the metrics stage ran at that commit too
        doc = json.loads(sidecar.read_text())
        doc["metrics"]["code"] = code(commit)
        sidecar.write_text(json.dumps(doc))
    return csv


def render(root: Path, config=CONFIG):
    decl = load_declaration("demo_table1", TABLES_DIR)
    frame = render_table(decl, config, load_metrics(sorted((root / "metrics").rglob("*.csv"))),
                         str(root / "metrics"))
    return decl, frame


def rows_of(frame, label):
    return frame[frame["row"] == label].iloc[0]


# ------------------------------------------------------------------------------------ recorded facts
def test_code_version_of_this_checkout_is_a_full_commit():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    code = prov.code_version()
    assert HEX40.fullmatch(code["commit"]) and isinstance(code["dirty"], bool)


def test_code_version_outside_a_checkout_is_unknown_with_a_reason(tmp_path):
    import shutil

    shutil.copytree(REPO / "src" / "anorefiner", tmp_path / "anorefiner",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", "import json; from anorefiner.provenance import code_version; "
                          "print(json.dumps(code_version()))"], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, check=True)
    code = json.loads(out.stdout)
    assert code["commit"] == "unknown" and code["dirty"] is None and code["reason"]
    assert prov.code_label(code).startswith("unknown (")


def test_run_record_holds_versions_device_and_settings_hash():
    record = prov.run_record("cpu", {"k": 1})
    assert record["versions"]["anorefiner"] and record["versions"]["numpy"] == np.__version__
    assert record["device"]["requested"] == "cpu" and record["device"]["gpu"] is None and record["device"]["cpu"]
    assert record["settings_sha256"] == prov.settings_sha256({"k": 1}) != prov.settings_sha256({"k": 2})


def test_weight_sources_of_random_trained_and_official_checkpoints(tmp_path):
    import torch

    assert prov.weight_source("random(seed=0)")["summary"].startswith(prov.RANDOM_WEIGHTS)
    assert prov.weight_source("openai")["summary"] == "pretrained backbone openai"
    trained = tmp_path / "trained_visa.pt"
    meta = {"epoch_losses": [0.5, 0.4, 0.3], "auxiliary_dataset": "visa",
            "run": json.dumps({"code": code("c" * 40)}), "backbone": json.dumps({"weights": "openai"})}
    torch.save({"w": torch.zeros(2), "meta": meta}, trained)
    src = prov.weight_source("openai", trained)
    ckpt = src["checkpoint"]
    assert (ckpt["kind"], ckpt["auxiliary_dataset"], ckpt["epochs"]) == ("trained", "visa", 3)
    assert ckpt["git_blob"] == subprocess.run(["git", "hash-object", str(trained)], capture_output=True,
                                              text=True).stdout.strip()
    assert f"trained by the pipeline at {'c' * 40} on visa, 3 epochs" in src["summary"] and not src["random"]
    official = tmp_path / "official_visa.pt"
    torch.save({"w": torch.ones(2)}, official)
    src = prov.weight_source("openai", official)
    assert src["checkpoint"]["kind"] == "official" and src["checkpoint"]["sha256"] in src["summary"]
    # adapters trained on a random backbone are random weights too
    meta["backbone"] = json.dumps({"weights": "random(seed=0)"})
    torch.save({"w": torch.zeros(2), "meta": meta}, trained)
    src = prov.weight_source("openai", trained)
    assert src["random"] and src["summary"].startswith(f"{prov.RANDOM_WEIGHTS} (trained by the pipeline at ")


def test_metrics_sidecar_copies_the_store_records(tmp_path):
    csv = scored_run(tmp_path, "musc", 0, "tiles", 0.5, commit="a" * 40)
    doc = json.loads(csv.with_suffix(".provenance.json").read_text())
    assert doc["stages"]["coarse"]["run"]["code"]["commit"] == "a" * 40
    assert doc["stages"]["coarse"]["weights"]["backbone"] == "imagenet"
    assert doc["metrics"]["code"]["commit"] == "a" * 40 and doc["metrics"]["device"]["cpu"]


# ------------------------------------------------------------------------------------ tables
def test_rows_carry_weights_code_and_random_marks(tmp_path):
    for seed in (0, 1):
        for cat in ("tiles", "widget"):
            scored_run(tmp_path, "musc_star", seed, cat, 0.8, commit="a" * 40)
            scored_run(tmp_path, "paclip", seed, cat, 0.7, commit="a" * 40, weights="random(seed=0)")
    scored_run(tmp_path, "musc", 0, "tiles", 0.9, commit="a" * 40)
    scored_run(tmp_path, "musc", 0, "widget", 0.9, commit="a" * 40)
    decl, frame = render(tmp_path)
    musc = rows_of(frame, "MuSc*")
    assert musc["weights"] == "pretrained backbone imagenet" and musc["code"] == "a" * 40
    assert musc["provenance_flag"] == "" and musc["seed_values"] == "0:80.0000;1:80.0000"
    assert rows_of(frame, "PA-CLIP")["weights"].startswith(prov.RANDOM_WEIGHTS)
    assert rows_of(frame, "MuSc/+ Ours")["weights"] == ""  # not run: no provenance to show
    block = table_block(decl.name, frame.attrs["provenance_rows"], CONFIG, "f" * 64)
    csv, md = write_table(frame, decl, tmp_path / "tables" / "demo_table1.csv", 1.0, block)
    text = md.read_text()
    assert f"| PA-CLIP ⚠ {prov.RANDOM_WEIGHTS} |" in text and "| MuSc\\* |" in text
    assert "## Provenance" in text and "sha256: " + "f" * 64 in text and "a" * 40 in text
    assert read_block(csv)["rows"][0]["n_inputs"] == 2  # MuSc: one seed, two categories
    assert set(read_rendered([csv])["code"]) == {"a" * 40, ""}


@pytest.mark.parametrize("case", ["commit", "weights", "missing"])
def test_a_row_mixing_provenances_is_flagged_in_table_and_audit(tmp_path, case):
    scored_run(tmp_path, "musc_star", 0, "tiles", 0.8, commit="a" * 40)
    scored_run(tmp_path, "musc_star", 1, "tiles", 0.8, commit="a" * 40)
    scored_run(tmp_path, "musc_star", 0, "widget", 0.8, commit="a" * 40)
    other = scored_run(tmp_path, "musc_star", 1, "widget", 0.8, commit="b" * 40 if case == "commit" else "a" * 40,
                       weights="random(seed=1)" if case == "weights" else "imagenet")
    if case == "missing":
        other.with_suffix(".provenance.json").unlink()
    decl, frame = render(tmp_path)
    flag = rows_of(frame, "MuSc*")["provenance_flag"]
    expected = {"commit": f"{MIXED}: 2 code states", "weights": f"{MIXED}: 2 weight sources",
                "missing": f"{NOT_RECORDED} for 1 of 4 inputs"}[case]
    assert expected in flag
    csv, md = write_table(frame, decl, tmp_path / "tables" / "demo_table1.csv", 1.0,
                          table_block(decl.name, frame.attrs["provenance_rows"], CONFIG))
    if case != "missing":
        assert f"MuSc\\* ⚠ {MIXED}" in md.read_text() or f"⚠ {MIXED}" in md.read_text()
    audit = write_audit([csv], tmp_path / "tables" / "audit.md", 1.0).read_text()
    assert "**1 row(s) flagged**" in audit and expected in audit


def test_audit_holds_the_provenance_block_and_refuses_a_table_without_one(tmp_path):
    scored_run(tmp_path, "musc", 0, "tiles", 0.9)
    scored_run(tmp_path, "musc", 0, "widget", 0.9)
    decl, frame = render(tmp_path)
    csv, _ = write_table(frame, decl, tmp_path / "tables" / "demo_table1.csv", 1.0,
                         table_block(decl.name, frame.attrs["provenance_rows"], CONFIG))
    audit = audit_markdown(read_rendered([csv]), 1.0, read_blocks([csv]))
    section = audit[audit.index("## Provenance"):audit.index("## Gains")]
    assert prov.code_label(prov.code_version()) in section
    assert re.search(r"configuration sha256: [0-9a-f]{64}", section)
    assert f"Packages: anorefiner {anorefiner.__version__}" in section and "coarse: CPU" in section
    assert "| demo_table1 | MVTec AD | MuSc | pretrained backbone imagenet |" in section
    csv.with_suffix(".provenance.json").unlink()
    with pytest.raises(FileNotFoundError, match="demo_table1.provenance.json"):
        write_audit([csv], tmp_path / "tables" / "audit.md", 1.0)
