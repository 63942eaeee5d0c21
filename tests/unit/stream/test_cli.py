"""``anorefiner stream`` as a real process: killed mid-run and restarted, nothing lost or scored twice; and the
scorer does not wait for training."""

import json
import signal
import subprocess
import sys
import time

import numpy as np

from anorefiner.stages import load_textures
from anorefiner.stream import StreamConfig, run_stream
from anorefiner.stream.results import ResultsLog, read_maps

from .test_stream import E, MIN_REFS, TINY, WINDOW, _options, _textures


# the project's default calibration: the restarted run must fit it again exactly
OPTIONS = {**TINY, "pgt": {**TINY["pgt"], "calibration": "isotonic"}}


def _command(out):
    return [sys.executable, "-m", "anorefiner", "stream", "--input", "-", "--category", "tiles", "--pretrained",
            "none", "--resolution", "64", "--backend", "musc", "--backend-options", '{"rscin": false}',
            "--options", json.dumps(OPTIONS), "--device", "cpu", "--wait-for-ard", "--out", str(out),
            "--stream-options", json.dumps({"window": WINDOW, "min_references": MIN_REFS, "eval_resolution": E})]


def _lines(path):
    return path.read_text().count("\n") if path.exists() else 0


def test_killed_stream_restarts_without_losing_or_repeating_an_image(tiles, tmp_path):
    out = tmp_path / "out"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(tiles["paths"]) + "\n")
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ANOREFINER_NO_PROGRESS": "1",
           "PYTHONPATH": ":".join(sys.path)}
    with open(listing) as stdin:
        proc = subprocess.Popen(_command(out), stdin=stdin, stderr=subprocess.PIPE, env=env)
        deadline = time.time() + 300
        # kill in group 2, once group 1's ARD is checkpointed
        while not (_lines(out / "results.jsonl") >= 6 and (out / "state" / "ard.pt").exists()):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the stream did not get to group 2"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    killed_at = _lines(out / "results.jsonl")
    assert 6 <= killed_at < 12
    with open(listing) as stdin:
        done = subprocess.run(_command(out), stdin=stdin, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"continuing after {killed_at} scored images (ARD trained through group" in done.stderr
    assert "restored from" in done.stderr
    log = ResultsLog(out / "results.jsonl").entries
    assert [e["index"] for e in log] == list(range(12))
    assert [e["path"] for e in log] == tiles["paths"]

    ref = tmp_path / "ref"
    run_stream(list(tiles["paths"]), ref, backbone=tiles["backbone"], backend_name="musc", backend=tiles["backend"],
               options=_options(calibration="isotonic"),
               config=StreamConfig(window=WINDOW, min_references=MIN_REFS, eval_resolution=E, wait_for_ard=True,
                                   overlay=False), seed=0,
               textures=load_textures("offline", 0, "tiles"))
    expected = ResultsLog(ref / "results.jsonl").entries
    assert [e["ard_group"] for e in log] == [e["ard_group"] for e in expected]
    for got, want in zip(log, expected):
        np.testing.assert_allclose(read_maps(out / got["maps"])["final"], read_maps(ref / want["maps"])["final"],
                                   rtol=0, atol=1e-5, err_msg=got["name"])


def test_scoring_does_not_wait_for_training(tiles, tmp_path):
    options = _options()
    options.pgt.epochs = 60  # training group 1 takes seconds, scoring the next image a fraction of one
    cfg = StreamConfig(window=WINDOW, min_references=MIN_REFS, eval_resolution=E, overlay=False)
    run_stream(list(tiles["paths"][:5]), tmp_path / "out", backbone=tiles["backbone"], backend_name="musc",
               backend=tiles["backend"], options=options, config=cfg, seed=0, textures=_textures())
    log = ResultsLog(tmp_path / "out" / "results.jsonl").scored
    first_of_group2 = log[4]
    assert first_of_group2["map"] == "coarse_scaled" and first_of_group2["ard_group"] is None
    maps = read_maps(tmp_path / "out" / first_of_group2["maps"])
    assert "ard" not in maps
    groups = [json.loads(line) for line in (tmp_path / "out" / "groups.jsonl").read_text().splitlines()]
    assert [g["group"] for g in groups] == [1]  # the stop waits for the queued training
    assert first_of_group2["t_done"] < first_of_group2["t_arrival"] + groups[0]["train_s"]
    # no ARD yet: combine(coarse_n, 0) by the gate, half the normalised coarse map where it is >= 0
    first = np.stack([read_maps(tmp_path / "out" / e["maps"])["coarse_patch"] for e in log[:4]])
    coarse_n = (maps["coarse"] - first.min()) / (first.max() - first.min())
    np.testing.assert_allclose(maps["final"], np.where(coarse_n >= 0, coarse_n / 2, coarse_n), rtol=0, atol=1e-6)
