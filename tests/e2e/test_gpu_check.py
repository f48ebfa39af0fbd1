"""benchmarks/gpu_check.py between the sessions that are lent a GPU: its dry run (`--device cpu
--tiny`) runs every step's code on CPU, from another folder, with wandb and scikit-learn missing
as on an image that lacks them, so the one command a GPU session has time for cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import PYTHON, REPO, run_env

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402  (standard library only at import: no torch here)

STEPS = ("0 environment", "1 cuda_tests", "2a throughput", "2b nvjpeg", "3 batch_auto", "4 ema_fp16", "5 grad_ckpt")


def test_the_dry_run_reports_every_step_and_no_failure(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    # A None in sys.modules is what a missing package looks like to import and to find_spec.
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules.update(dict.fromkeys(('wandb', 'sklearn')))\n")
    out = tmp_path / "report" / "gpu_check.md"
    env = run_env(PYTHONPATH=os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([PYTHON, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                             "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {row.split(" | ")[0].removeprefix("| ") for row in rows} == set(STEPS), rows
    assert not [row for row in rows if "| failed" in row], rows
    environment = next(row for row in rows if row.startswith("| 0 environment"))
    assert "missing: sklearn, wandb" in environment and "forked from one preloaded process" in environment
    assert "generated photos (no scikit-learn)" in out.read_text()
    tests = next(row for row in rows if row.startswith("| 1 cuda_tests"))
    assert int(re.search(r"(\d+) skipped", tests).group(1)) > 0 and "0 failed" in tests and "no CUDA" in tests
    assert "not collected: test_device_decode.py needs sklearn" in tests  # it imports sklearn at the top
    assert "===== 5 grad_ckpt" in out.with_suffix(".log").read_text()


def test_junit_outcomes_sort_passed_failed_and_skipped(tmp_path):
    xml = tmp_path / "results.xml"
    xml.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.unit.test_ema" name="test_a" />
<testcase classname="tests.unit.test_ema" name="test_b"><failure message="assert 1 == 2" /></testcase>
<testcase classname="tests.unit.test_precision" name="test_c"><error message="fixture" /></testcase>
<testcase classname="tests.unit.test_precision" name="test_d"><skipped message="needs two CUDA GPUs" /></testcase>
<testcase classname="" name="tests.unit.test_device_decode"><error message="collection failure">
E   ModuleNotFoundError: No module named 'sklearn.datasets'; 'sklearn' is not a package</error></testcase>
<testcase classname="" name="tests.unit.test_batch_size"><error message="collection failure">
E   ModuleNotFoundError: No module named 'trainer.assemble.batch_sizes'</error></testcase>
</testsuite></testsuites>""")
    assert gpu_check.junit_outcomes(xml) == {
        "passed": ["test_ema::test_a"],
        "failed": ["test_ema::test_b", "test_precision::test_c", "::tests.unit.test_batch_size"],  # our own module
        "skipped": ["needs two CUDA GPUs"], "missing": ["test_device_decode.py needs sklearn"]}


@pytest.mark.parametrize("argv, message", [
    (["--only", "nvjpeg,warp"], "--only: unknown step warp; the steps are cuda_tests, throughput, nvjpeg"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_bad_arguments_name_what_would_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
