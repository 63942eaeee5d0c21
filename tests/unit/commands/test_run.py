"""``anorefiner run``'s backbone options (the whole run: tests/unit/test_stages.py)."""

from anorefiner.commands.run import backbone_pos_embed


def test_run_builds_musc_features_as_the_official_code():
    assert backbone_pos_embed("ViT-L-14-336", "musc", None) == "bicubic_no_antialias"
    assert backbone_pos_embed("ViT-L-14-336", "april_gan", None) == "bicubic"
    assert backbone_pos_embed("ViT-L-14-336", "musc", "bicubic") == "bicubic"  # --pos-embed wins
    assert backbone_pos_embed("efficientnet_lite0", "musc", None) is None  # CNNs have no position embedding
