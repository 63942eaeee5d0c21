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
    (lambda c: c["seas"]["options"].update(guidance=2), r"'seas \(dataset mvtec_ad\)\.guidance' for SeaSConfig"),
    (lambda c: c["seas"]["datasets"]["visa"].update(mask_threshold=1.5), r"seas \(dataset visa\).*mask_threshold"),
    (lambda c: c["seas"]["datasets"].update(mvtec_3d={}), r"seas\.datasets: \['mvtec_3d'\] are not configured"),
])
def test_typos_and_bad_values_name_the_key(edit, message):
    config = copy.deepcopy(_config())
    edit(config)
    with pytest.raises(ConfigError, match=message):
        check_workflow_config(config)


def test_seas_options_merge_the_dataset_overrides():
    from anorefiner.config_check import seas_config

    visa, mvtec = seas_config(_config(), "visa"), seas_config(_config(), "mvtec_ad")
    assert (visa.guidance_scale, visa.rotation, visa.small_defect_masks) == (2.0, False, True)
    assert (mvtec.guidance_scale, mvtec.rotation, mvtec.small_defect_masks) == (8.0, True, False)
    assert refiner_options(_config(), "seas")["synthesis"]["method"] == "seas"


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


def _official(name, aux="visa", **extra):
    def edit(c):
        c["backends"][name].update(weights="official", **extra)
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["backends"]["rareclip"]["train"]["visa"].update(epochz=3),
     r"unknown config key 'backends\.rareclip\.train\.visa\.epochz' for TrainConfig"),
    (lambda c: c["backends"]["rareclip"]["train"]["visa"].update(epochs=-5),
     r"backends\.rareclip\.train\.visa\.epochs must be > 0, got -5"),
    (lambda c: c["backends"]["april_gan"]["train"]["mvtec_ad"].update(lr=0), r"april_gan\.train\.mvtec_ad\.lr must be > 0"),
    (lambda c: c["datasets"]["visa"].update(root="/nonexistent/VisA"),
     r"datasets\.visa\.root: folder /nonexistent/VisA does not exist"),
    (_official("april_gan", official={"visa": {"url": "/nonexistent/visa_pretrained.pth"}}),
     r"backends\.april_gan\.official\.visa\.url: the official checkpoint file /nonexistent/visa_pretrained\.pth"),
    (_official("vcp_clip"), r"backends\.vcp_clip\.weights: official: .*Google Drive.*set backends\.vcp_clip\.official\.\w+\.url"),
    (_official("adaclip"), r"backends\.adaclip\.weights: official: .*by hand"),
    (_official("regad_4shot"), r"backends\.regad_4shot\.weights: official: no official regad checkpoint"),
    (lambda c: c["backends"]["promptad_4shot"]["train"]["mvtec_ad"].update(epochs=0),
     r"backends\.promptad_4shot\.train\.mvtec_ad\.epochs must be > 0"),
    (lambda c: c["backbones"]["vit_l14_336"].update(pretrained="laion2b_s32b_b79k"),
     r"backbones\.vit_l14_336\.pretrained: pretrained 'laion2b_s32b_b79k' of 'ViT-L-14-336' has no pinned download"),
    (lambda c: c["backbones"]["vit_l14_336"].update(pretrained="/nonexistent/ViT-L-14-336px.pt"),
     r"backbones\.vit_l14_336\.pretrained: weights file '/nonexistent/ViT-L-14-336px\.pt' does not exist"),
    (lambda c: c["backbones"]["resnet50"].update(pos_embed="bicubic_no_antialias"),
     r"backbones\.resnet50\.pos_embed: 'bicubic_no_antialias' is an open_clip ViT option; 'resnet50' is a CNN"),
], ids=["train_typo", "negative_epochs", "zero_lr", "dataset_root", "official_file", "vcp_clip_official",
        "adaclip_official", "regad_official", "fewshot_epochs", "unpinned_tag", "missing_weights_file",
        "cnn_pos_embed"])
def test_training_datasets_and_files_name_the_key(edit, message):
    config = copy.deepcopy(_config())
    edit(config)
    with pytest.raises(ConfigError, match=message):
        check_workflow_config(config)


def test_official_sources_that_pass(tmp_path):
    """A verified default (APRIL-GAN's git blobs) and a local file the user downloaded for VCP-CLIP pass."""
    config = copy.deepcopy(_config())
    _official("april_gan")(config)
    local = {aux: {"url": str(tmp_path / f"train_{aux}.pth")} for aux in ("visa", "mvtec_ad")}
    for entry in local.values():
        Path(entry["url"]).write_bytes(b"x")
    _official("vcp_clip", official=local)(config)
    check_workflow_config(config)


def _dry_run(tmp_path, *args):
    cmd = [sys.executable, "-m", "snakemake", "-n", "--workflow-profile", "none", "--cores", "1", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_dry_run_refuses_training_typo_and_says_how_to_run_the_demo(tmp_path):
    """`backends.rareclip.train.visa.epochz` (merged like any --configfile) fails the dry-run naming the key;
    config/demo.yaml without --replace-workflow-config says what to do instead of an unrelated TTA message."""
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"backends": {"rareclip": {"train": {"visa": {"epochz": 3}}}}}))
    proc = _dry_run(tmp_path, "tables/table1.csv", "--configfile", str(path))
    assert proc.returncode != 0 and "backends.rareclip.train.visa.epochz" in proc.stdout + proc.stderr
    proc = _dry_run(tmp_path, "--configfile", str(REPO / "config" / "demo.yaml"))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "--replace-workflow-config" in text and "profiles/demo" in text, text[-2000:]
    assert "TTA" not in text and "musc_star_tipi" not in text


def test_musc_rows_read_features_resized_as_musc_official_code():
    """Every MuSc backend on a CLIP backbone (MuSc, MuSc*, their TTA rows, hence PGT on their maps) reads a backbone
    entry with MuSc's own position-embedding resize (plain bicubic, its vendored open_clip); APRIL-GAN, VCP-CLIP and
    PA-CLIP keep the antialiased default."""
    from anorefiner.backbones import CNN_NAMES
    from anorefiner.zsad.registry import BACKEND_TYPES

    for name in ("config.yaml", "smoke_paper.yaml"):
        config = _config(name)
        backends = config["backends"]
        kinds = {k: backends[b["base"]]["type"] if b["type"] == "tta" else b["type"] for k, b in backends.items()}
        musc = [k for k, kind in kinds.items() if kind == "musc"
                and config["backbones"][backends[k]["backbone"]]["name"] not in CNN_NAMES]
        assert {"musc", "musc_star"} <= set(musc)
        for key in musc:
            assert config["backbones"][backends[key]["backbone"]].get("pos_embed") == "bicubic_no_antialias", key
        for key in ("april_gan", "vcp_clip", "paclip"):
            if key in backends:
                assert config["backbones"][backends[key]["backbone"]].get("pos_embed", "bicubic") == "bicubic"
    assert BACKEND_TYPES["musc"].pos_embed == "bicubic_no_antialias" and BACKEND_TYPES["april_gan"].pos_embed == "bicubic"
