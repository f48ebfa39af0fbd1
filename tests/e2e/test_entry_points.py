"""Every entry script works from any folder and with the repository root on PYTHONPATH (as cluster
jobs often run), where a script named like a package (the old launch/models.py) shadowed it."""

from __future__ import annotations

import subprocess

from helpers import PYTHON, REPO, run_env

MISSING = "/nonexistent/imgtrain-images"
# (script, arguments, expected exit code, text expected in the output). Each call goes deep enough
# to import the packages the script uses: a config is resolved, a run is built or a file is read.
CALLS = [
    ("train.py", [f"data.root={MISSING}", "model.name=tiny_cnn", "--print-config"], 0, "[data]"),
    ("list_models.py", ["--check", "tiny_cnn"], 0, "tiny_cnn: ok"),
    ("lr_find.py", [f"data.root={MISSING}", "model.name=tiny_cnn", "--steps", "3"], 2, "error: "),
    ("overfit_check.py", [f"data.root={MISSING}", "model.name=tiny_cnn"], 2, "error: "),
    ("show_batch.py", [f"data.root={MISSING}", "model.name=tiny_cnn"], 2, "error: "),
    ("audit.py", [MISSING], 2, "error: "),
    ("predict.py", ["--checkpoint", "missing.safetensors", "x.jpg"], 2, "error: "),
    ("evaluate.py", ["--checkpoint", "missing.safetensors", "--split", "val"], 2, "error: "),
]


def test_every_entry_script_runs_from_another_folder_with_the_root_on_pythonpath(tmp_path):
    # Without PYTHONPATH, from another folder, is how every other end-to-end test runs the scripts.
    launched = [(call, subprocess.Popen([PYTHON, str(REPO / "launch" / call[0]), *call[1]], cwd=tmp_path,
                                        env=run_env(PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
                for call in CALLS]
    for (script, _, code, text), process in launched:
        out, err = process.communicate(timeout=300)
        assert process.returncode == code, f"{script}: {err[-2000:]}"
        assert text in out + err and "Traceback" not in err, f"{script}: {err[-2000:]}"
        if code == 2:
            assert err.strip().count("\n") == 0, f"{script} printed more than one line: {err}"


def test_no_entry_script_is_named_like_a_package():
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    assert not {p.stem for p in (REPO / "launch").glob("*.py")} & packages
