"""Named places where a test can have the process killed, to prove that a run killed there resumes.

`CROSSMAP_FAILPOINT=NAME:N` (or `*:N` for any name) sends SIGKILL to the process at the N-th time
it passes a failpoint of that name; unset, `failpoint` costs one dictionary lookup.  The places are
the writes a resume depends on: each JSON record between its temporary file and its rename, the
kept pairs and the ridge map, and every SAE training checkpoint.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    spec = os.environ.get("CROSSMAP_FAILPOINT")
    if not spec:
        return
    want, _, count = spec.rpartition(":")
    if want not in (name, "*"):
        return
    _hits[want] = _hits.get(want, 0) + 1
    if _hits[want] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
