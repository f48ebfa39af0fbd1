"""SIGTERM and SIGINT become "finish this step, write a checkpoint, exit with EXIT_PREEMPTED".

Exit codes of `launch/train.py`: 0 done, 2 bad input, 75 (EX_TEMPFAIL, "try again") preempted by
SIGTERM/SIGINT after writing a checkpoint: run the same command with run.resume=auto to continue.
A second Ctrl-C stops at once, without a checkpoint.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

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

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received: int | None = None
        self._previous: dict = {}

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
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.received = signum

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
