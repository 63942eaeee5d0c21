"""AnoRefiner on a production line (``anorefiner stream``, docs/stream.md): images scored as they arrive, the ARD
trained group by group in the background (PGT, AnoRefiner Sec. 3.2, Fig. 6) and swapped in for the next images.

* :mod:`.source`: the watched folder or the list of paths, in arrival order;
* :mod:`.scorer`: online coarse maps (per-image backends; MuSc against a window of earlier images);
* :mod:`.rows`: the features and coarse maps of the recent images the scorer and the training still need;
* :mod:`.service`: the training thread, the ARD in service, its checkpoint;
* :mod:`.results`: per-image maps and overlays, the append-only results log;
* :mod:`.runner`: :func:`run_stream`, the loop (and the restart).
"""

from .config import StreamConfig
from .runner import run_stream

__all__ = ["StreamConfig", "run_stream"]
