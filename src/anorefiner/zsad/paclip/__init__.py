"""PA-CLIP (pseudo-anomaly-aware CLIP): PAD, PAM and MPAM memory banks on CLIP patch features.

* :mod:`.backend`: :class:`PACLIPBackend` and :class:`PACLIPConfig`;
* :mod:`.coreset`: the greedy coreset sampling of its memory banks (PatchCore).
"""

from .backend import PACLIPBackend, PACLIPConfig
from .coreset import greedy_coreset

__all__ = ["PACLIPBackend", "PACLIPConfig", "greedy_coreset"]
