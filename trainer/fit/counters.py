"""Where a run stands: epoch, position in it and optimizer step, as a checkpoint saves them and a
resume puts them back. The same before and after a resume, so logs and schedules continue
without a gap or a repeat."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Position:
    epoch: int = 1
    samples_done: int = 0  # samples of this epoch already trained (all processes)
    global_step: int = 0  # optimizer steps in the whole run
    totals: list | None = None  # running loss/correct/seen (and step counts) of a checkpointed epoch
    best_name: str | None = None  # the checkpoint folder holding the best epoch so far
    saved_start_lrs: list[float] | None = None  # the rates an interrupted epoch started with

    def next_epoch(self) -> None:
        self.epoch, self.samples_done = self.epoch + 1, 0
