"""SIGTERM and SIGINT become "finish this step, write a checkpoint, exit with EXIT_PREEMPTED".

Exit codes of `launch/train.py`: 0 done, 2 bad input, 75 (EX_TEMPFAIL, "try again") preempted by
SIGTERM/SIGINT after writing a checkpoint: run the same command with run.resume=auto to continue.
A second Ctrl-C stops at once, without a checkpoint (exit 130). Each signal is answered at once
in one line on stderr (the main process's): what happens now, and what a resume starts from.
The lines are written with os.write: a signal handler that prints through sys.stderr while the
interrupted code is printing raises "reentrant call" instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch

from trainer.files.checkpoints import read_pointer

EXIT_PREEMPTED = 75
# With several processes, how often (in optimizer steps) they agree whether any was signalled.
STOP_CHECK_EVERY = 8


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with EXIT_PREEMPTED."""

    def __init__(self, folder: Path):
        super().__init__(EXIT_PREEMPTED)
        self.folder = folder


class StopSignals:
    """Catches SIGTERM/SIGINT while installed; every process asks `agreed` at the same steps."""

    def __init__(self, accelerator, checkpoints: Path | None = None):
        self.accelerator = accelerator
        self.checkpoints = checkpoints  # the run's checkpoint folder: what a second Ctrl-C leaves is named
        self.received: int | None = None
        self._previous: dict = {}
        self._speaks = accelerator.num_processes == 1 or accelerator.is_main_process

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            self._say(self.stopping_now())
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.received is None:
            name = signal.Signals(signum).name
            again = " (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else ""
            self._say(f"{name}: finishing this step and writing a checkpoint{again}")
        self.received = signum

    def stopping_now(self) -> str:
        """The line of a second Ctrl-C: nothing more is written; a resume starts from the newest
        complete checkpoint (one being written stays incomplete and is not used)."""
        newest = read_pointer(self.checkpoints / "latest") if self.checkpoints is not None else None
        kept = (f"run.resume=auto continues from the newest complete checkpoint, {self.checkpoints / newest}"
                if newest else "no checkpoint was complete yet: run.resume=auto starts the run over")
        return f"second Ctrl-C: stopping now, without a checkpoint; {kept}"

    def _say(self, line: str) -> None:
        if not self._speaks:
            return
        try:
            os.write(sys.stderr.fileno(), f"\n{line}\n".encode())
        except (OSError, ValueError):  # stderr replaced by an object without a file descriptor
            print(f"\n{line}", file=sys.stderr, flush=True)

    def agreed(self, global_step: int, last_of_epoch: bool) -> bool:
        """Whether any process was signalled; every process must take the same decision at the same step."""
        if self.accelerator.num_processes == 1:
            return self.received is not None
        if global_step % STOP_CHECK_EVERY and not last_of_epoch:
            return False  # agreeing is a collective the host waits for: not every step
        flag = torch.tensor([int(self.received is not None)], device=self.accelerator.device)
        flag = self.accelerator.reduce(flag, reduction="sum")
        if flag.item() and self.received is None:
            self.received = signal.SIGTERM
        return bool(flag.item())
