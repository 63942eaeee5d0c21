"""Workflow config sections checked against the library's dataclasses when the workflow loads (issue 18, item 4)."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anorefiner.config import ConfigError
from anorefiner.config_check import check_workflow_config, refiner_options

REPO = Path(__file__).resolve().parents[2]


def _config(name="config.yaml") -> dict:
    return yaml.safe_load((REPO / "config" / name).read_text())


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_shipped_configs_pass(name):
    check_workflow_config(_config(name))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["pgt"].update(epochz=3), r"unknown config key 'pgt\.epochz' for PGTConfig"),
    (lambda c: c["ard"].update(atention="aa"), r"'ard\.atention' for ARDConfig"),
    (lambda c: c["synthesis"].update(metod="cutpaste"), r"'synthesis\.metod' for SynthesisConfig"),
    (lambda c: c["variants"].update(r9={"pgt": {"n_pseudo_normals": 9}}), r"'variants\.r9\.pgt\.n_pseudo_normals'"),
    (lambda c: c["variants"].update(bad={"pgtt": {}}), r"variants\.bad: unknown section\(s\) \['pgtt'\]"),
    (lambda c: c["variants"].update(sched={"pgt": {"schedule": "random"}}), r"variants\.sched.*pgt\.schedule='random'"),
    (lambda c: c["backends"]["musc_star"]["options"].update(group_sise=30),
     r"'backends\.musc_star\.options\.group_sise' for MuscConfig"),
    (lambda c: c["backends"]["paclip"]["options"].update(alpah=0.5), r"'backends\.paclip\.options\.alpah' for PACLIPConfig"),
    (lambda c: c["backends"].update(mine={"type": "byo", "backbone": "vit_l14_336", "options": {"musc": {"topmn": 1}}}),
     r"'backends\.mine\.options\.musc\.topmn' for MuscConfig"),
])
def test_typos_and_bad_values_name_the_key(edit, message):
    config = copy.deepcopy(_config())
    edit(config)
    with pytest.raises(ConfigError, match=message):
        check_workflow_config(config)


def test_variant_options_merge_over_the_base_sections():
    merged = refiner_options(_config(), "u20")
    assert merged["pgt"]["group_size"] == 20 and merged["pgt"]["epochs"] == 20 and merged["ard"]["anob"] is True
    with pytest.raises(ConfigError, match="variant 'nope' is not configured"):
        refiner_options(_config(), "nope")


def test_dry_run_refuses_a_typo_before_any_job(tmp_path):
    """`snakemake -n` with `pgt: {epochz: 3}` fails at load, naming the key (it used to pass)."""
    config = _config()
    config["pgt"]["epochz"] = 3
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--workflow-profile", "none", "--cores", "1",
           "--configfile", str(path), "--replace-workflow-config", "tables/table1.csv"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "unknown config key 'pgt.epochz' for PGTConfig" in proc.stdout + proc.stderr


def test_byo_config_example_in_the_docs_is_valid():
    text = (REPO / "docs" / "byo.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    example = yaml.safe_load(block)["backends"]
    config = copy.deepcopy(_config())
    config["backends"].update(example)
    check_workflow_config(config)
    assert example["mymethod"]["type"] == "byo" and "{category}" in example["mymethod"]["maps"]
    example["mymethod"]["options"]["musc"]["r_lst"] = [1]
    config["backends"].update(example)
    with pytest.raises(ConfigError, match=r"backends\.mymethod\.options\.musc\.r_lst"):
        check_workflow_config(config)
