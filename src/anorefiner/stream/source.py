"""Where the stream's images come from, in arrival order: a watched folder, or a list of paths (stdin).

Folder (:func:`watch_folder`): polled every ``poll_s`` seconds. A new file is taken once it looks complete: its
size and modification time did not change since the previous poll, or it was last modified more than
``poll_s`` ago (a file copied in place grows between polls; write files under a temporary name and rename them
for certainty: hidden files and other extensions are ignored). Files taken at the same poll are ordered by
modification time, then name; that is the arrival order. A file keeps its place once taken (later changes of
it are not seen). Stops after ``idle_timeout_s`` seconds without a new file (None: never).

List (:func:`read_list`): one path per line, in the order given; empty lines ignored; stops at the end.

Both yield ``(path, t_arrival)`` (``time.time()`` when the image was first seen) and skip ``done`` (paths the
results log already holds, so a restart takes up where the killed run stopped).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Iterator


def watch_folder(folder: str | Path, *, extensions, poll_s: float = 0.5, idle_timeout_s: float | None = None,
                 done=frozenset()) -> Iterator[tuple[str, float]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"stream input folder {folder} does not exist")
    extensions = tuple(e.lower() for e in extensions)
    taken = set(done)
    first_seen: dict[str, tuple[float, int, int]] = {}  # path -> (time first seen, size, mtime_ns)
    last_new = time.time()
    while True:
        now = time.time()
        ready = []
        for entry in os.scandir(folder):
            name = entry.name
            if name.startswith(".") or not name.lower().endswith(extensions) or not entry.is_file():
                continue
            path = str(Path(entry.path).resolve())
            if path in taken:
                continue
            st = entry.stat()
            seen = first_seen.get(path)
            stable = seen is not None and seen[1:] == (st.st_size, st.st_mtime_ns)
            if stable or now - st.st_mtime > poll_s:
                ready.append((st.st_mtime_ns, name, path, seen[0] if seen else now))
            else:
                first_seen[path] = (seen[0] if seen else now, st.st_size, st.st_mtime_ns)
        for _, _, path, t_seen in sorted(ready):
            taken.add(path)
            first_seen.pop(path, None)
            yield path, t_seen
            last_new = time.time()  # idle time counts from when the consumer asks again, not from the yield
        if idle_timeout_s is not None and time.time() - last_new > idle_timeout_s:
            return
        if not ready:
            time.sleep(poll_s)


def read_list(lines: Iterable[str], *, done=frozenset()) -> Iterator[tuple[str, float]]:
    taken = set(done)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        path = str(Path(line).resolve())
        if path in taken:
            continue
        taken.add(path)
        yield path, time.time()
