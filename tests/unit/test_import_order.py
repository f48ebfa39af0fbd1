"""The written import order (pyproject.toml, [tool.importlinter]) holds, and the check can fail."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("configs", "data", "models", "trainer")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def lint(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the copy's packages, not the editable install's, are the ones analysed.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=120, env=env)


def copy_of_the_packages(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_contracts_are_kept(tmp_path):
    result = lint(copy_of_the_packages(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("lower, upper, broken", [
    ("trainer/files/faults.py", "trainer.fit.loop", "trainer/ stages"),
    ("trainer/inference/predict.py", "trainer.reporting.tracking", "neither W&B"),
    ("data/folders.py", "trainer.task.metrics", "Packages"),
])
def test_a_lower_stage_reaching_up_breaks_a_contract(tmp_path, lower, upper, broken):
    root = copy_of_the_packages(tmp_path)
    path = root / lower
    path.write_text(path.read_text() + f"\nimport {upper}  # reaches up\n")
    result = lint(root)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout
    assert upper in result.stdout


def test_predict_evaluate_export_load_neither_wandb_nor_the_training_assembly():
    script = ("import sys; import trainer.inference.predict, trainer.inference.evaluate, trainer.export.export_run\n"
              "bad = [m for m in sys.modules if m == 'wandb' or m.startswith(('wandb.', 'trainer.assemble', "
              "'trainer.fit', 'trainer.reporting.tracking'))]\nprint(bad)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
