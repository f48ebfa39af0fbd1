"""Deliberate crashes at named points, so tests can kill a real run exactly where they mean to.

    IMGTRAIN_CRASH_AT="after_step:7"        SIGKILL right after optimizer step 7
    IMGTRAIN_CRASH_AT="checkpoint_write:12" SIGKILL while checkpoint 12 is written (files there, no COMPLETE)
    IMGTRAIN_CRASH_AT="epoch_end:2"         SIGKILL after epoch 2's checkpoint, before epoch 3
    IMGTRAIN_CRASH_AT="checkpoint_files:6"  while checkpoint 6's files are written (use with ENOSPC)
    IMGTRAIN_CRASH_AT="model_file:2"        while epoch 2's last/best.safetensors are written (use with ENOSPC)
    IMGTRAIN_CRASH_SIGNAL=TERM              send SIGTERM instead (the graceful preemption path)
    IMGTRAIN_CRASH_SIGNAL=ENOSPC            raise OSError(ENOSPC) there instead: a full disk

Several points may be given, comma-separated. The signal is real (os.kill on this process), so
what follows is what a cluster's kill would do. Unset, every call is a dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal


def crash_point(name: str, count: int) -> None:
    spec = os.environ.get("IMGTRAIN_CRASH_AT")
    if not spec:
        return
    for item in spec.split(","):
        where, _, at = item.strip().partition(":")
        if where == name and at.strip() == str(count):
            kind = os.environ.get("IMGTRAIN_CRASH_SIGNAL", "KILL").upper()
            if kind == "ENOSPC":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.kill(os.getpid(), signal.SIGTERM if kind == "TERM" else signal.SIGKILL)
