import os
import sys
from pathlib import Path

# Before anything loads torch (its OpenMP runtime reads this once): idle OpenMP threads sleep instead
# of spinning. On this suite's shared cores (two workers, each with training subprocesses) spinning
# threads burn a third of a tiny run's CPU time waiting; results are the same, bit for bit.
# Subprocesses inherit it (helpers.run_env sets it too).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

# Import this checkout's packages even where another checkout is installed in editable mode.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_image_folder, reset_accelerate_state  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tiers: everything under tests/e2e/ is `e2e` (`make test-fast` runs the rest)."""
    for item in items:
        if "e2e" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def image_folder(tmp_path):
    """A tiny learnable class-folder dataset: 3 classes x 12 images of 16x16 pixels."""
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Split folders for whole tiny trainings: 48 train images (3 batches of 16 or 6 of 8), 15 val."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=16, layout="split-folders")


@pytest.fixture
def fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.fixture(scope="session", autouse=True)
def _audit_caches_in_the_sessions_folder(tmp_path_factory):
    """Module and session fixtures start before the per-test settings below: their runs' audit
    caches go to this session's tmp folder, not ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("IMGTRAIN_AUDIT_DIR", str(tmp_path_factory.mktemp("audit-cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Audit caches and reports of every training run go to the test's tmp folder, not ~/.cache.
    monkeypatch.setenv("IMGTRAIN_AUDIT_DIR", str(tmp_path / "audit-cache"))
