"""Writes the machine refuses (a full disk, a read-only folder) end in one line, exit code 1, with
nothing half-written; a fresh start owns its logs; leftovers of killed writers are removed.

Full disks are simulated: a writer monkeypatched to raise OSError(ENOSPC) part-way, or a folder
made read-only with chmod (skipped as root, whom chmod does not stop)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from configs.errors import ProjectError
from data.files import WriteFailed, append_line, atomic_folder, atomic_output, remove_dead_leftovers, write_failed
from helpers import make_image_folder, precision_config, reset_accelerate_state

ROOT = os.geteuid() == 0
needs_chmod = pytest.mark.skipif(ROOT, reason="root writes into read-only folders")


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped): no process has it now."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ---- appends: a whole line or nothing ----

def test_an_append_cut_by_a_full_disk_leaves_the_log_whole(tmp_path, monkeypatch):
    log = tmp_path / "train_steps.jsonl"
    append_line(log, json.dumps({"step": 1}))
    real_write = os.write

    def half_then_full(fd, data):  # the kernel takes part of the line, then the disk is full
        if len(data) > 4:
            return real_write(fd, data[:4])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        append_line(log, json.dumps({"step": 2, "loss": 0.5}))
    monkeypatch.undo()
    assert log.read_text() == '{"step": 1}\n'


def test_step_log_and_metrics_log_on_a_full_disk_are_one_line(tmp_path, monkeypatch):
    from trainer.reporting import console, tracking

    class Main:
        is_main_process = True

    run = tracking.RunTracking.__new__(tracking.RunTracking)
    run.accelerator, run.run_dir, run._mark, run.tracker = Main(), tmp_path, None, None
    report = console.RunReport(Main(), tmp_path)
    report._header_printed = True
    monkeypatch.setattr(tracking, "append_line", full_disk)
    monkeypatch.setattr(console, "append_line", full_disk)
    with pytest.raises(WriteFailed) as step:
        run.train_step(1, 5, 0.5, 0.7, 0.1, 8)
    with pytest.raises(WriteFailed) as epoch:
        report.epoch({"epoch": 1, "train_loss": 0.5, "is_best": True})
    for e, name in ((step, "train_steps.jsonl"), (epoch, "metrics.jsonl")):
        message = str(e.value)
        assert e.value.exit_code == 1 and "\n" not in message
        assert name in message and "the disk is full" in message and "run.resume=auto" in message


def test_a_fresh_start_empties_the_logs_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    """Killed before its first checkpoint, a run restarts fresh (nothing to resume): its logs must
    start empty, not carry the killed attempt's rows (duplicate steps and epochs)."""
    from trainer.files.run_lock import mark_run_folder
    from trainer.fit.loop import train

    images = make_image_folder(tmp_path / "images", per_class=6)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mark_run_folder(run_dir)
    old_steps = [{"step": s, "epoch": 1, "epoch_progress": 0.5, "loss": 9.0, "lr": 0.1} for s in (1, 2)]
    (run_dir / "train_steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_steps) + '{"step": 3, "lo')
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 9.0}) + "\n")
    reset_accelerate_state()
    train(precision_config(images, run_dir, "train.epochs=1", "data.batch_size=8", "train.log_every_steps=1"))
    steps = [json.loads(line) for line in (run_dir / "train_steps.jsonl").read_text().splitlines()]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1)) and 9.0 not in [s["loss"] for s in steps]
    assert [e["epoch"] for e in epochs] == [1] and epochs[0]["train_loss"] != 9.0


def test_the_one_line_names_the_reason(tmp_path):
    cases = {errno.ENOSPC: "the disk is full", errno.EROFS: "read-only", errno.EACCES: "permission denied",
             errno.EDQUOT: "quota"}
    for code, words in cases.items():
        error = write_failed(tmp_path / "x", OSError(code, os.strerror(code)), "nothing changed")
        assert isinstance(error, ProjectError) and error.exit_code == 1
        assert str(error).startswith(f"could not write {tmp_path / 'x'}: ") and words in str(error)
        assert str(error).endswith("; nothing changed")


# ---- the COMPLETE marker and run.resume ----

def _write_checkpoints(root: Path, steps) -> None:
    import torch
    from accelerate import Accelerator

    from trainer.files.checkpoints import save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in steps:
        state = {"global_step": step, "epoch": 1, "epoch_complete": False, "samples_done": step, "history": [],
                 "epochs_without_improvement": 0, "scheduler": {}, "class_names": ["a", "b"], "config": {}}
        save_checkpoint(Accelerator(cpu=True), root, step, model_state=model.state_dict(),
                        optimizer_state=optimizer.state_dict(), trainer_state=state,
                        rank_tensors={"torch_cpu": torch.get_rng_state()}, rank_json={})


@pytest.mark.parametrize("marker", ["[]", '{"files": []}', '{"files": {"model.safetensors": 5}}', '"x"',
                                    '{"files": {"../../outside": {"bytes": 1, "sha256": "0"}}}', "{}"])
def test_a_complete_marker_of_the_wrong_shape_is_a_damaged_checkpoint_auto_passes_over(tmp_path, marker):
    """Valid JSON of another shape is a damaged marker, as a torn one is: `auto` warns and resumes from
    the older checkpoint (no traceback), and a named checkpoint is refused in one line."""
    from configs.errors import UsageError
    from trainer.fit.restore import find_checkpoint

    root = tmp_path / "checkpoints"
    _write_checkpoints(root, [3, 6])
    (root / "step-00000006" / "COMPLETE").write_text(marker)
    warnings = []
    folder, state = find_checkpoint("auto", root, warnings.append)
    assert folder.name == "step-00000003" and state["global_step"] == 3
    assert len(warnings) == 1 and warnings[0].startswith("skipping checkpoint step-00000006: ")
    assert "COMPLETE is damaged" in warnings[0] and "\n" not in warnings[0]
    with pytest.raises(UsageError, match="COMPLETE is damaged"):
        find_checkpoint(str(root / "step-00000006"), root, print)


def test_resume_from_a_folder_that_is_no_run_says_so(tmp_path):
    from configs.errors import UsageError
    from trainer.fit.restore import find_checkpoint

    folder = tmp_path / "etc"
    (folder / "ssh").mkdir(parents=True)
    (folder / "passwd").write_text("root:x:0:0\n")
    with pytest.raises(UsageError) as e:
        find_checkpoint(str(folder), tmp_path / "run" / "checkpoints", print)
    assert "is not a checkpoint" in str(e.value) and "not a run folder" in str(e.value)
    assert "stopped while writing" not in str(e.value)
