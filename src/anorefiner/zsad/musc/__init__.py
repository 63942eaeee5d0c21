"""MuSc (Li et al., ICLR 2024): mutual scoring of the unlabeled test images, with RsCIN re-scoring.

* :mod:`.backend`: LNAMD, MSM, :class:`MuscBackend` and :class:`MuscConfig`;
* :mod:`.rscin`: RsCIN, the image-level re-scoring (also used by the MuSc TTA backend).
"""

from .backend import MuscBackend, MuscConfig, lnamd, msm, score, score_queries
from .rscin import rscin

__all__ = ["MuscBackend", "MuscConfig", "lnamd", "msm", "rscin", "score", "score_queries"]
