"""The stage layer (anorefiner.stages): provenance of reused intermediates, stale temp files."""

import json
import logging

import numpy as np
import pytest

from anorefiner import stages
from anorefiner.cli import main as cli
from anorefiner.refine.store import read_refined
from anorefiner.zsad.store import read_coarse

TINY = json.dumps({
    "ard": {"feat_channels": 16, "anomaly_channels": 8, "aa_channels": 12, "head_channels": 8},
    "pgt": {"group_size": 6, "n_pseudo_normal": 2, "n_anomalies_per_normal": 2, "epochs": 2, "batch_size": 2},
})


def _run(root, out, backend="musc", seed=0, options=TINY, extra=()):
    return cli(["run", "--data-root", str(root), "--category", "tiles", "--dataset", "demo",
                "--backbone", "efficientnet_lite0", "--resolution", "64", "--eval-resolution", "32",
                "--backend", backend, "--backend-options", json.dumps({"rscin": False} if "musc" in backend else {}),
                "--options", options, "--seed", str(seed), "--no-pro", "--device", "cpu", "--out", str(out), *extra])


def test_first_difference_names_the_dotted_key():
    a = {"backend": "musc", "options": {"r_list": [1, 3, 5], "topmin": 0.3}, "seed": 0}
    assert stages.first_difference(a, json.loads(json.dumps(a))) is None
    assert stages.first_difference(a, {**a, "backend": "paclip"}) == "backend: 'musc' there, 'paclip' now"
    b = {**a, "options": {"r_list": [1, 3], "topmin": 0.3}}
    assert stages.first_difference(a, b).startswith("options.r_list:")
    assert "not recorded" in stages.first_difference({}, {"seed": 1})
    # where/how fast a result is computed is recorded but not compared
    assert stages.canonical({"options": {"device": "cuda", "chunk": 5, "k": (1, 2)}}) == {"options": {"k": [1, 2]}}


def test_run_recomputes_intermediates_made_with_other_settings(demo_dataset, tmp_path, caplog):
    """musc then paclip (another seed) into one --out: the second run must not refine musc's maps."""
    out = tmp_path / "run"
    assert _run(demo_dataset, out, "musc", seed=0) == 0
    musc = read_coarse(out / "coarse.h5")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="anorefiner"):
        assert _run(demo_dataset, out, "paclip", seed=3) == 0
    text = caplog.text
    assert f"reusing {out / 'features.h5'}" in text  # same backbone and images: the features are valid
    assert f"reusing {out / 'coarse.h5'}" not in text and f"reusing {out / 'refined.h5'}" not in text
    assert "backend: 'musc' there, 'paclip' now" in text  # the log names the setting that differs
    coarse = read_coarse(out / "coarse.h5")
    assert coarse.attrs["backend"] == "paclip" and coarse.attrs["seed"] == 3
    assert not np.allclose(coarse.maps, musc.maps)
    refined = read_refined(out / "refined.h5")
    assert refined.attrs["backend"] == "paclip" and refined.attrs["seed"] == 3
    assert refined.attrs["provenance"]["coarse"]["backend"] == "paclip"
    # the run records (docs/audit.md): the refined store carries its coarse store's, run.json both
    from anorefiner.provenance import code_version, settings_sha256

    assert refined.attrs["run"]["code"] == code_version() and refined.attrs["run"]["device"]["cpu"]
    coarse_run = refined.attrs["inputs"]["coarse"]["run"]
    assert coarse_run["settings_sha256"] == settings_sha256(refined.attrs["provenance"]["coarse"])
    assert refined.attrs["weights"] == refined.attrs["inputs"]["coarse"]["weights"]
    assert set(json.loads((out / "run.json").read_text())["provenance"]) == {"coarse", "refined"}
    np.testing.assert_allclose(refined.scores["coarse"], coarse.scores)

    # Same settings again: everything is reused, nothing rewritten.
    mtimes = {p: (out / p).stat().st_mtime_ns for p in ("features.h5", "coarse.h5", "refined.h5")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="anorefiner"):
        assert _run(demo_dataset, out, "paclip", seed=3) == 0
    assert {p: (out / p).stat().st_mtime_ns for p in mtimes} == mtimes
    # Another refiner option: coarse maps reused, refined store recomputed (naming the option).
    caplog.clear()
    other = json.loads(TINY)
    other["pgt"]["epochs"] = 1
    with caplog.at_level(logging.INFO, logger="anorefiner"):
        assert _run(demo_dataset, out, "paclip", seed=3, options=json.dumps(other)) == 0
    assert f"reusing {out / 'coarse.h5'}" in caplog.text
    assert "options.pgt.epochs: 2 there, 1 now" in caplog.text
    assert read_refined(out / "refined.h5").attrs["options"]["pgt"]["epochs"] == 1


def test_run_recomputes_features_of_another_resolution(demo_dataset, tmp_path, caplog):
    out = tmp_path / "run"
    assert _run(demo_dataset, out) == 0
    with caplog.at_level(logging.INFO, logger="anorefiner"):
        assert cli(["run", "--data-root", str(demo_dataset), "--category", "tiles", "--dataset", "demo",
                    "--resolution", "96", "--eval-resolution", "32", "--backend-options", '{"rscin": false}',
                    "--options", TINY, "--no-pro", "--device", "cpu", "--out", str(out)]) == 0
    assert "resolution: 64 there, 96 now" in caplog.text
    from anorefiner.cache import read_attrs

    assert read_attrs(out / "features.h5")["resolution"] == 96
    assert read_coarse(out / "coarse.h5").maps.shape[1:] == (12, 12)  # stride 8 at 96 px


def test_stages_remove_stale_temp_files_of_their_outputs(demo_dataset, tmp_path):
    """A killed writer leaves .<name>.*.tmp beside its output; the next writer of that output removes it."""
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".coarse.h5.k1ll3d.h5.tmp", out / ".refined.h5.x.h5.tmp", out / ".metrics.csv.y.csv.tmp",
             out / ".features.h5.z.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    keep = out / ".other.h5.a.tmp"
    keep.write_bytes(b"not ours")
    assert _run(demo_dataset, out) == 0
    assert not any(p.exists() for p in stale)
    assert keep.exists()


def test_subcommand_removes_stale_temp_of_its_out(demo_dataset, tmp_path):
    out = tmp_path / "idx.csv"
    stale = tmp_path / ".idx.csv.abc123.csv.tmp"
    stale.write_text("half")
    assert cli(["index", "--root", str(demo_dataset), "--category", "tiles", "--out", str(out)]) == 0
    assert out.is_file() and not stale.exists()


def test_run_refuses_a_wrong_size_mask_before_any_compute(demo_dataset, tmp_path, caplog):
    import shutil

    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(demo_dataset / "tiles", root / "tiles")
    mask = sorted((root / "tiles" / "ground_truth").rglob("*_mask.png"))[0]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="anorefiner"):
        assert _run(root, out) == 1
    assert f"mask {mask} is 10x10 (HxW) but its image" in caplog.text and "is 64x64" in caplog.text
    assert not out.exists() or not any(out.iterdir())  # nothing computed, nothing half-written


def test_ground_truth_of_mixed_size_images_needs_and_uses_a_resolution(demo_dataset, tmp_path):
    import shutil

    from PIL import Image

    from anorefiner.data.index import index_category

    root = tmp_path / "data"
    shutil.copytree(demo_dataset / "tiles", root / "tiles")
    index = index_category(root, "tiles", split="test")
    row = index[index.label == 1].iloc[0]
    for path, resample in ((row.image_path, Image.BILINEAR), (row.mask_path, Image.NEAREST)):
        Image.open(path).resize((96, 96), resample).save(path)  # one image (and its mask) at 96 px
    ids = list(index.image_id)
    with pytest.raises(ValueError, match=r"test images differ in size .*96x96.*64x64|64x64.*96x96"):
        stages.ground_truth(root, "demo", "tiles", ids)
    masks, labels = stages.ground_truth(root, "demo", "tiles", ids, resolution=32)
    assert masks.shape == (len(ids), 32, 32) and masks[ids.index(row.image_id)].any()
    assert labels.tolist() == index.label.tolist()


@pytest.mark.parametrize("backend, expected", [
    ("musc_star", ["musc_star: scoring 12 images in 2 group(s)", "musc_star: group 1/2 (6 images) scored",
                   "musc_star: group 2/2 (6 images) scored"]),
    ("paclip", ["paclip: 2 normal images selected", "paclip: scale r=1 (1/3) scored for 12 images",
                "paclip: scale r=5 (3/3) scored for 12 images"]),
])
def test_coarse_stage_reports_progress(demo_dataset, tmp_path, caplog, backend, expected):
    """The coarse maps (minutes at paper scale) log a line per MuSc group / PA-CLIP scale, not silence."""
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import index_category

    index = index_category(demo_dataset, "widget", dataset="demo")
    backbone = build_backbone("efficientnet_lite0", 64, pretrained=None)
    feats = stages.features(index, backbone, tmp_path / "f.h5")
    kind = "paclip" if backend == "paclip" else "musc"
    opts = {"group_size": 6, "rscin": False} if kind == "musc" else {}
    options = stages.backend_options(kind, opts, dataset="demo", category="widget", device="cpu")
    with caplog.at_level(logging.INFO, logger="anorefiner"):
        stages.coarse(feats, backend, kind, options, seed=0, dataset="demo", category="widget",
                      out=tmp_path / "c.h5")
    for line in expected:
        assert line in caplog.text, (line, caplog.text)


def test_refine_refuses_coarse_maps_of_other_features(demo_dataset, tmp_path):
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import index_category
    from anorefiner.refine.pgt import RefinerOptions

    index = index_category(demo_dataset, "widget", dataset="demo")
    small, large = (build_backbone("efficientnet_lite0", r, pretrained=None) for r in (64, 96))
    f64 = stages.features(index, small, tmp_path / "f64.h5")
    f96 = stages.features(index, large, tmp_path / "f96.h5")
    opts = stages.backend_options("musc", {"rscin": False}, dataset="demo", category="widget", device="cpu")
    coarse = stages.coarse(f64, "musc", "musc", opts, seed=0, dataset="demo", category="widget",
                           out=tmp_path / "c.h5")
    with pytest.raises(ValueError, match=r"computed from other features .*resolution: 64 there, 96 now"):
        stages.refine(demo_dataset, "demo", "widget", f96, coarse, backbone=large, backend_name="musc",
                      backend_type="musc", backend_opts=opts, options=RefinerOptions(), seed=0,
                      eval_resolution=32, out=tmp_path / "r.h5")
    assert not (tmp_path / "r.h5").exists()


def test_refine_refuses_coarse_maps_of_another_seed_for_a_seed_dependent_backend(demo_dataset, tmp_path):
    """MuSc* draws its groups with the seed: seed-0 maps refined by a seed-1 run would score the pseudo-anomalies in
    other groups than the real images; a seed-free backend (MuSc over all images) may share its maps."""
    from anorefiner.backbones import build_backbone
    from anorefiner.data.index import index_category
    from anorefiner.refine.pgt import RefinerOptions

    index = index_category(demo_dataset, "widget", dataset="demo")
    backbone = build_backbone("efficientnet_lite0", 64, pretrained=None)
    feats = stages.features(index, backbone, tmp_path / "f.h5")
    options = RefinerOptions()
    options.pgt.epochs = 0
    for name, opts, refused in (("musc_star", {"group_size": 6, "rscin": False}, True),
                                ("musc_cnn", {"rscin": False}, False)):
        opts = stages.backend_options("musc", opts, dataset="demo", category="widget", device="cpu")
        coarse = stages.coarse(feats, name, "musc", opts, seed=0, dataset="demo", category="widget",
                               out=tmp_path / f"{name}.h5")
        run = dict(backbone=backbone, backend_name=name, backend_type="musc", backend_opts=opts, options=options,
                   seed=1, eval_resolution=32, out=tmp_path / f"{name}_r.h5")
        if refused:
            with pytest.raises(ValueError, match=r"made with seed 0, PGT runs seed 1: backend 'musc_star'"):
                stages.refine(demo_dataset, "demo", "widget", feats, coarse, **run)
            assert not (tmp_path / f"{name}_r.h5").exists()
        else:
            assert stages.refine(demo_dataset, "demo", "widget", feats, coarse, **run).exists()


def test_cache_backbone_takes_the_position_embedding_resize_of_the_cache(demo_dataset, tiny_clip, tmp_path):
    """PGT's and the coarse stage's backbone is rebuilt with the cache's resize (MuSc's official plain bicubic);
    asking for another one, or giving a backbone resized otherwise, is an error naming the attribute."""
    import torch

    from anorefiner.backbones import build_backbone
    from anorefiner.cache import extract_features, read_attrs
    from anorefiner.data.index import index_category

    index = index_category(demo_dataset, "tiles", dataset="demo").head(2)
    musc = build_backbone(tiny_clip, 56, pretrained=None, pos_embed="bicubic_no_antialias")  # 3x3 -> 4x4 grid
    attrs = read_attrs(extract_features(index, musc, tmp_path / "f.h5", batch_size=2))
    assert attrs["pos_embed"].startswith("bicubic_no_antialias")
    again = stages.cache_backbone(attrs, tiny_clip, pretrained="none", device="cpu")
    assert again.pos_embed_mode == "bicubic_no_antialias" and torch.equal(again.pos_embed, musc.pos_embed)
    with pytest.raises(ValueError, match="attribute 'pos_embed' is 'bicubic_no_antialias' but 'bicubic' was asked"):
        stages.cache_backbone(attrs, tiny_clip, pretrained="none", device="cpu", pos_embed="bicubic")
    with pytest.raises(ValueError, match="attribute 'pos_embed' is 'bicubic_no_antialias .*'bicubic antialias"):
        stages.check_backbone(attrs, build_backbone(tiny_clip, 56, pretrained=None))
