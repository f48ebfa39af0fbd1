"""Training over a dirty folder: the audit leaves out bad files, failures at load are skipped, leakage can stop."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dirty_data import BOMB_LIMIT, expected_problems, make_dirty_folder
from helpers import run_in_process, run_script
from trainer.files.model_file import read_metadata

UNDECODABLE = {"train/cat/empty.jpg", "train/cat/error_page.jpg", "train/dog/notes.png", "train/cat/truncated.jpg",
               "train/dog/corrupt.png", "train/dog/bomb.png"}


def _train(root: Path, tmp_path: Path, *overrides: str, runner=run_script):
    return runner("train.py", f"data.root={root}", f"run.dir={tmp_path / 'run'}", "model.name=tiny_cnn",
                  "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=1",
                  f"data.max_image_pixels={BOMB_LIMIT}", f"data.audit_dir={tmp_path / 'audit'}", *overrides,
                  cwd=tmp_path)


def test_training_over_dirty_folder_leaves_out_what_the_audit_finds(tmp_path):
    root = make_dirty_folder(tmp_path / "dirty")
    result = _train(root, tmp_path, "data.normalize=dataset", "data.sampler=balanced", "train.class_weights=balanced",
                    'data.augment_ops=["color_jitter(brightness=0.2)", "random_erasing(p=0.5)"]',
                    "data.cutmix_alpha=1.0", "data.mixup_alpha=0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left out 10 of 50 files" in result.stdout
    assert "1 validation images are identical to training images" in result.stdout
    report_path = Path(re.search(r"report: (\S+report\.json)", result.stdout).group(1))
    report = json.loads(report_path.read_text())
    assert {p["relpath"]: p["problem"] for p in report["problems"]} == expected_problems()

    # The standalone audit over the same folder, without the cache, finds the same files (its main
    # in-process: tests/e2e/test_audit_cli.py runs audit.py as a subprocess).
    cli = run_in_process("audit.py", str(root), "--max-pixels", str(BOMB_LIMIT), "--no-cache",
                         "--audit-dir", str(tmp_path / "audit2"), "--report", str(tmp_path / "cli.json"),
                         cwd=tmp_path)
    assert cli.returncode == 1
    assert json.loads((tmp_path / "cli.json").read_text())["problems"] == report["problems"]

    # Dataset statistics: computed once, cached next to the report, recorded in the checkpoint.
    stats = json.loads((report_path.parent / "stats.json").read_text())
    meta = read_metadata(tmp_path / "run" / "last.safetensors")
    assert meta["mean"] == stats["mean"] and meta["std"] == stats["std"]
    assert stats["images"] == 31 and all(0.0 < s < 0.5 for s in stats["std"])
    assert not (tmp_path / "run" / "load_failures.jsonl").exists()


def test_with_the_audit_off_files_that_fail_to_load_are_skipped_and_recorded(tmp_path):
    root = make_dirty_folder(tmp_path / "dirty")
    result = _train(root, tmp_path, "data.audit=off")
    assert result.returncode == 0, result.stderr[-3000:]
    failures = [json.loads(line) for line in (tmp_path / "run" / "load_failures.jsonl").read_text().splitlines()]
    assert {Path(f["path"]).relative_to(root).as_posix() for f in failures} == UNDECODABLE
    assert "6 files failed to load during training and were skipped" in result.stdout
    assert not (tmp_path / "audit").exists()  # the audit really was off


def test_leakage_is_an_error_when_asked(tmp_path):
    root = make_dirty_folder(tmp_path / "dirty")
    # Refused before training starts: the entry point runs in-process (the tests above run it for real).
    result = _train(root, tmp_path, "data.leakage=error", runner=run_in_process)
    assert result.returncode == 2
    assert "identical to training images" in result.stderr and "data.leakage=warn" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
