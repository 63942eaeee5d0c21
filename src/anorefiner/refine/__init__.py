"""AnoRefiner refinement (paper Sec. 3): the Anomaly Refinement Decoder (:mod:`.ard`), pseudo-anomaly
synthesis (:mod:`.perlin`, :mod:`.synthesis`), progressive group-wise test-time training
(:mod:`.pgt`), the Table 12 baseline decoders (:mod:`.decoders`) and the refined store (:mod:`.store`)."""

from .ard import ARD, ARBlock, AnomalyAttention, ARDConfig, BidirectionalInteraction, SpatialAttention, fuse_layers
from .pgt import PGTConfig, RefinerOptions, run_pgt
from .trainer import dice_loss
from .store import Refined, read_refined, write_refined
from .synthesis import SynthesisConfig, synthesize

__all__ = [
    "ARD", "ARBlock", "AnomalyAttention", "ARDConfig", "BidirectionalInteraction", "SpatialAttention", "fuse_layers",
    "PGTConfig", "RefinerOptions", "dice_loss", "run_pgt", "Refined", "read_refined", "write_refined",
    "SynthesisConfig", "synthesize",
]
