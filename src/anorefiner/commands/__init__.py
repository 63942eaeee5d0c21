"""One module per ``anorefiner`` subcommand (see :mod:`anorefiner.cli`), and the arguments several share."""

#: ``--pos-embed`` choices: :data:`anorefiner.backbones.clip_vit.POS_EMBED_RESIZE`, restated because the parsers
#: must not import torch (tests/unit/commands keep the two equal).
POS_EMBED_CHOICES = ("bicubic", "bicubic_no_antialias", "bilinear")


def add_pos_embed_argument(p, default: str = "bicubic, antialiased") -> None:
    """``--pos-embed``: the open_clip ViT's position-embedding resize (``backbones.<key>.pos_embed``)."""
    p.add_argument("--pos-embed", choices=POS_EMBED_CHOICES, default=None,
                   help=f"open_clip ViTs: position-embedding resize (default {default}; MuSc's official features: "
                        "bicubic_no_antialias; recorded in the feature cache and checked by its readers)")
