"""lr_find.py and overfit_check.py as a user runs them; timm loads our checkpoints unchanged."""

from helpers import run_in_process, run_script

COMMON = ["model.name=tiny_cnn", "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
          "data.augment=none"]


def test_overfit_check_passes_on_a_learnable_batch(image_folder, tmp_path):
    result = run_script("overfit_check.py", f"data.root={image_folder}", *COMMON, "optim.lr=0.01",
                        "--steps", "150", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASSED" in result.stdout


def test_overfit_check_fails_when_nothing_can_learn(image_folder, tmp_path):
    # In-process (5 steps, no fresh interpreter needed); the test above runs overfit_check.py for real.
    result = run_in_process("overfit_check.py", f"data.root={image_folder}", *COMMON, "optim.lr=1e-9",
                            "--steps", "5", cwd=tmp_path)
    assert result.returncode == 1 and "FAILED" in result.stdout


def test_lr_find_writes_a_plot_and_a_suggestion(image_folder, tmp_path):
    out = tmp_path / "lr.png"
    result = run_script("lr_find.py", f"data.root={image_folder}", *COMMON, "optim.backbone_lr_mult=0.1",
                        "--steps", "30", "--start", "1e-5", "--end", "1", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    line = next(l for l in result.stdout.splitlines() if l.startswith("suggested optim.lr="))
    assert 1e-5 <= float(line.split("=")[1].split()[0]) <= 1
    assert "(the 2 parameter groups' ratios to the head kept)" in line
