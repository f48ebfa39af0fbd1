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


# ---- export ----

def test_an_export_on_a_full_disk_is_a_machine_fault_not_an_unexportable_model(tmp_path, monkeypatch):
    """The ONNX exporter wraps the OSError in its own error: still a full disk (exit 1), not "does not
    export to ONNX" (exit 2); nothing is left, and a killed export's leftover is removed on the way."""
    import torch

    from data.transforms import Preprocessing
    from models import HeadSpec, build_classifier
    from trainer.export.export_run import ExportRequest, export_checkpoint
    from trainer.files.model_file import ClassifierFacts, save_classifier

    pytest.importorskip("onnxruntime")
    built = build_classifier("tiny_cnn", 3)
    checkpoint = tmp_path / "best.safetensors"
    facts = ClassifierFacts("tiny_cnn", HeadSpec().to_dict(), ["a", "b", "c"],
                            Preprocessing(16, 1.0, tuple(built.mean), tuple(built.std)), config={})
    save_classifier(checkpoint, built.model.state_dict(), facts, metrics={"val_acc": 0.5}, epoch=1)

    def exporter_on_a_full_disk(*args, **kwargs):
        try:
            full_disk()
        except OSError as e:
            raise RuntimeError("Failed to save the ONNX model") from e

    monkeypatch.setattr(torch.onnx, "export", exporter_on_a_full_disk)
    killed = tmp_path / f".export.tmp-{dead_pid()}"
    killed.mkdir()
    (killed / "model.onnx").write_bytes(b"partial")
    out = tmp_path / "export"
    with pytest.raises(WriteFailed) as e:
        export_checkpoint(ExportRequest(str(checkpoint), str(out), "onnx"))
    assert e.value.exit_code == 1 and str(e.value).startswith(f"could not write {out}: the disk is full")
    assert "does not export" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]


def test_a_quoted_os_error_is_recognised_as_a_full_disk():
    from safetensors import SafetensorError

    from data.files import write_fault_in

    quoted = SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    assert write_fault_in(quoted).errno == errno.ENOSPC
    assert write_fault_in(SafetensorError("header too large")) is None
    assert write_fault_in(ValueError("(os error 2)")) is None  # a missing file is not a refused write


# ---- the audit's folder ----

def test_an_unwritable_audit_folder_is_one_warning_and_the_audit_goes_on(tmp_path, monkeypatch, capsys):
    """A full disk or a read-only data.audit_dir: the caches and the report are not written, one
    warning names the key to set, the audit's answer is the same."""
    import data.audit_cache as audit_cache
    from data.audit import audit_splits
    from data.audit_training import prepare_training_data
    from data.folders import discover
    from configs.schema import DataConfig

    images = make_image_folder(tmp_path / "images", per_class=4)
    splits = discover(images, 0.25, 0)
    audit_cache._said.clear()
    monkeypatch.setattr(audit_cache, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, os.strerror(errno.EROFS))))
    monkeypatch.setattr("data.audit.atomic_write_json", audit_cache.atomic_write_json)
    d = DataConfig(root=str(images), audit="on", normalize="dataset", audit_dir=str(tmp_path / "audit"))
    prepared = prepare_training_data(splits, d, True, lambda line: None)
    assert len(prepared.mean) == 3 and prepared.audit.files_checked == 12
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: could not write ")
    assert "read-only" in warnings[0] and "data.audit_dir" in warnings[0]
    assert "make it writable" in warnings[0] and "free space" not in warnings[0]
    again = audit_splits(splits, audit_dir=str(tmp_path / "audit"))  # nothing cached: measured again
    assert again.cache_hits == 0 and again.files_checked == 12


def test_a_read_only_home_moves_the_default_audit_folder_to_the_temporary_folder(tmp_path, monkeypatch, capsys):
    import tempfile

    import data.audit_cache as audit_cache

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("IMGTRAIN_AUDIT_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(home)) else real_access(p, mode))
    audit_cache._said.clear()
    root = audit_cache.default_cache_root()
    assert root == tmp_path / "tmp" / f"imgtrain-audit-{os.getuid()}" and root.is_dir()
    note = capsys.readouterr().err
    assert note.startswith(f"note: {home / '.cache' / 'imgtrain' / 'audit'} cannot be written") and "data.audit_dir" in note
    monkeypatch.setattr(os, "access", real_access)
    assert audit_cache.default_cache_root() == home / ".cache" / "imgtrain" / "audit"


# ---- the entry points' last net, and what an error line echoes ----

def test_the_line_names_the_file_asked_for_not_its_temporary_name(tmp_path):
    from data.files import machine_fault

    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".preds.csv.tmp-4242.csv"))
    assert str(machine_fault(error)).startswith(f"the disk is full ({tmp_path / 'preds.csv'}); free space there")
    inside = OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / ".export.tmp-17" / "model.onnx"))
    assert f"({tmp_path / 'export' / 'model.onnx'})" in str(write_failed(tmp_path / "export", inside))


def test_a_huge_config_value_is_not_echoed_whole(tmp_path):
    from helpers import run_in_process

    huge = "x" * 10_000_000  # a 10 MB value (a file pasted where a name goes)
    result = run_in_process("train.py", "data.root=/x", f"data.augment={huge}", "--print-config", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and len(result.stderr) < 3000
    assert "characters left out" in result.stderr


def test_a_refused_write_no_writer_caught_is_still_one_line(capsys, monkeypatch):
    import sys

    from helpers import REPO

    monkeypatch.syspath_prepend(str(REPO / "launch"))
    from cli import run_main

    def main():
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/run/curves.png")

    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the file system is read-only (/data/run/curves.png)")

    def bug():
        raise FileNotFoundError(errno.ENOENT, "No such file", "x")  # not a refused write: keeps its traceback

    with pytest.raises(FileNotFoundError):
        run_main(bug)
    assert sys.exc_info() == (None, None, None)


# ---- predict --csv ----

def test_predict_csv_says_which_rows_have_no_prediction(tmp_path):
    """Rows whose image is missing (or listed twice) get no row in the output: counted and the first
    ones named by line, not dropped silently."""
    import numpy as np
    import torch

    from data.transforms import Preprocessing
    from helpers import make_image, run_in_process
    from models import HeadSpec, build_classifier
    from trainer.files.model_file import ClassifierFacts, save_classifier

    built = build_classifier("tiny_cnn", 3)
    checkpoint = tmp_path / "best.safetensors"
    facts = ClassifierFacts("tiny_cnn", HeadSpec().to_dict(), ["a", "b", "c"],
                            Preprocessing(16, 1.0, tuple(built.mean), tuple(built.std)), config={})
    save_classifier(checkpoint, built.model.state_dict(), facts, metrics={"val_acc": 0.5}, epoch=1)
    (tmp_path / "test").mkdir()
    for name in ("a1", "b2"):
        make_image(np.random.default_rng(0), 0).save(tmp_path / "test" / f"{name}.png")
    missing = [f"gone{i}.png" for i in range(7)]
    (tmp_path / "test.csv").write_text("file\na1.png\n" + "\n".join(missing) + "\nb2.png\na1.png\n")
    common = ["--checkpoint", str(checkpoint), "--csv", str(tmp_path / "test.csv"), "--num-workers", "0"]
    result = run_in_process("predict.py", *common, "--out", "none.csv", cwd=tmp_path)  # paths not under tmp_path
    assert result.returncode == 2 and not (tmp_path / "none.csv").exists()
    assert result.stderr.startswith(f"error: none of the 10 rows of {tmp_path / 'test.csv'} has a usable image, e.g. "
                                    f"test.csv line 2: a1.png not found under {tmp_path}")
    result = run_in_process("predict.py", *common, "--data-root", str(tmp_path / "test"), "--out", "preds.csv",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 3  # header, a1, b2
    err = result.stderr.splitlines()
    start = next(i for i, line in enumerate(err) if "row(s) of the CSV have no row in" in line)
    assert err[start].startswith("warning: 8 row(s) of the CSV have no row in preds.csv: 7 missing, 1 duplicate_row")
    assert err[start + 1] == f"  test.csv line 3: gone0.png not found under {tmp_path / 'test'}"
    assert err[start + 6] == "  ... and 3 more"
    del torch


# ---- leftovers of killed writers ----

def test_leftovers_of_killed_writers_go_and_only_theirs(tmp_path):
    """`.NAME.tmp-PID[.suffix]` of a dead PID, file or folder, is removed by the next writer of NAME;
    a live process's, another name's and a name that only looks alike stay."""
    dead = dead_pid()
    gone = [tmp_path / f".best.safetensors.tmp-{dead}.safetensors", tmp_path / f".export.tmp-{dead}"]
    kept = [tmp_path / f".best.safetensors.tmp-{os.getppid()}.safetensors",  # a live writer's
            tmp_path / f".last.safetensors.tmp-{dead}.safetensors",  # another file's
            tmp_path / f".best.safetensors.tmp-{dead}x.safetensors", tmp_path / "best.safetensors.tmp-1"]
    gone[1].mkdir()
    (gone[1] / "model.onnx").write_bytes(b"partial")
    for path in [gone[0], *kept]:
        path.write_bytes(b"partial")
    with atomic_output(tmp_path / "best.safetensors") as tmp:
        tmp.write_bytes(b"whole")
    with atomic_folder(tmp_path / "export") as folder:
        (folder / "model.onnx").write_bytes(b"whole")
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)
    assert (tmp_path / "best.safetensors").read_bytes() == b"whole"
    assert remove_dead_leftovers(tmp_path / "best.safetensors") == []
