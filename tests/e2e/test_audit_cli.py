"""audit.py as a subprocess: the report, quarantine moves without deleting; bad arguments (in-process main)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dirty_data import BOMB_LIMIT, expected_problems, make_dirty_folder
from helpers import run_in_process, run_script


@pytest.fixture
def dirty(tmp_path) -> Path:
    return make_dirty_folder(tmp_path / "dirty")


def test_cli_reports_and_quarantine_moves_without_deleting(dirty, tmp_path):
    before = sorted(p.relative_to(dirty).as_posix() for p in dirty.rglob("*") if p.is_file())
    report = tmp_path / "audit.csv"
    quarantine = tmp_path / "quarantine"
    args = (str(dirty), "--max-pixels", str(BOMB_LIMIT), "--audit-dir", str(tmp_path / "c"))
    result = run_script("audit.py", *args, "--report", str(report), "--quarantine", str(quarantine), cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # problems were found
    assert "decompression_bomb" in result.stdout and "imbalance" in result.stdout
    rows = list(csv.DictReader(report.open()))
    assert {row["relpath"]: row["problem"] for row in rows} == expected_problems()

    moved = sorted(p.relative_to(quarantine).as_posix() for p in quarantine.rglob("*") if p.is_file())
    assert moved == sorted(expected_problems())
    after = sorted(p.relative_to(dirty).as_posix() for p in dirty.rglob("*") if p.is_file())
    assert sorted(after + moved) == before  # every file is somewhere: nothing deleted
    for rel in ("train/cat/dup_a.png", "train/dog/leak.png"):  # one copy of each duplicate stays
        assert (dirty / rel).is_file()
    assert (quarantine / "train/cat/empty.jpg").stat().st_size == 0

    # The audit again, in-process (the same entry point; the run above is the process): nothing left.
    again = run_in_process("audit.py", *args, "--report", str(tmp_path / "again.json"), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((tmp_path / "again.json").read_text())["problems"] == []


@pytest.mark.parametrize("args, message", [
    (["--quarantine", "{root}/q"], "inside the data root"),
    (["--report", "out.txt"], "name a .json or .csv file"),
    (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
])
def test_cli_bad_arguments_exit_2_with_one_line(image_folder, tmp_path, args, message):
    args = [a.format(root=image_folder) for a in args]
    # Argument checks end before any work: the entry point runs in-process (the test above runs it for real).
    result = run_in_process("audit.py", str(image_folder), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
