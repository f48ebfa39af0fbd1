"""Deliberate crashes at named points, so tests can kill a real run exactly where they mean to.

    IMGTRAIN_CRASH_AT="after_step:7"        SIGKILL right after optimizer step 7
    IMGTRAIN_CRASH_AT="checkpoint_write:12" SIGKILL while checkpoint 12 is written (files there, no COMPLETE)
    IMGTRAIN_CRASH_AT="epoch_end:2"         SIGKILL after epoch 2's checkpoint, before epoch 3
    IMGTRAIN_CRASH_SIGNAL=TERM              send SIGTERM instead (the graceful preemption path)

Several points may be given, comma-separated. The signal is real (os.kill on this process), so
what follows is what a cluster's kill would do. Unset, every call is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str, count: int) -> None:
    spec = os.environ.get("IMGTRAIN_CRASH_AT")
    if not spec:
        return
    for item in spec.split(","):
        where, _, at = item.strip().partition(":")
        if where == name and at.strip() == str(count):
            sig = signal.SIGTERM if os.environ.get("IMGTRAIN_CRASH_SIGNAL", "KILL").upper() == "TERM" else signal.SIGKILL
            os.kill(os.getpid(), sig)
