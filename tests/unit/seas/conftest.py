"""A tiny random Stable Diffusion (anorefiner.seas.tiny) saved to disk, and a SeaS model trained from it on the
demo dataset's "widget" category (4 defect types), shared by the SeaS tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from anorefiner.seas.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "sd", seed=0)


def tiny_seas_config(**overrides):
    from anorefiner.config import from_dict
    from anorefiner.seas.config import SeaSConfig
    from anorefiner.seas.tiny import tiny_config

    return from_dict(SeaSConfig, tiny_config(**overrides), "seas")


@pytest.fixture(scope="session")
def seas_model(tiny_sd, demo_dataset, tmp_path_factory):
    from anorefiner.seas.train import train_seas

    out = tmp_path_factory.mktemp("seas_model") / "widget"
    return train_seas(demo_dataset, "demo", "widget", tiny_sd, tiny_seas_config(), out)
