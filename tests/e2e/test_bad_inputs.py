"""Bad input ends with exit code 2, one line on stderr, and no run folder written.

One case runs `python launch/train.py` as a real subprocess; the others call the same entry point in
this interpreter (helpers.run_in_process), which saves an interpreter start (torch imports) per case."""

import shutil

import pytest
import torch
from safetensors.torch import save_file

from helpers import REPO, make_image_folder, run_in_process, run_script


def _no_weights_for_this_model(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(path))
    return [f"model.weights={path}"]


CASES = {
    "missing root": (lambda tmp: ["data.root=" + str(tmp / "nowhere")], "data.root does not exist"),
    "empty class folder": (lambda tmp: (make_image_folder(tmp / "img"), (tmp / "img" / "cat").mkdir(),
                                        ["data.root=" + str(tmp / "img")])[-1], "has no images"),
    "one class only": (lambda tmp: (make_image_folder(tmp / "img", classes=("red",)),
                                    ["data.root=" + str(tmp / "img")])[-1], "only one class"),
    "class mismatch": (lambda tmp: (make_image_folder(tmp / "img", layout="split-folders"),
                                    shutil.rmtree(tmp / "img" / "val" / "red"),
                                    ["data.root=" + str(tmp / "img")])[-1], "missing from val/: red"),
    "unknown model": (lambda tmp: ["model.name=timm/resnet1800"], "unknown model 'timm/resnet1800'"),
    "weights for another architecture": (_no_weights_for_this_model, "does not fit tiny_cnn with 3 classes"),
    "unknown key": (lambda tmp: ["train.epoch=3"], "did you mean 'train.epochs'?"),
    "data.root is the package": (lambda tmp: [f"data.root={REPO / 'data'}"], "code package"),
}
# The case that gets furthest (a model built, weights read) runs as a real subprocess.
SUBPROCESS_CASE = "weights for another architecture"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(case, tmp_path, image_folder):
    make_args, message = CASES[case]
    run_dir = tmp_path / "run"
    args = [f"data.root={image_folder}", "model.name=tiny_cnn", f"run.dir={run_dir}", "train.epochs=1",
            *make_args(tmp_path)]
    if case == SUBPROCESS_CASE:
        result = run_script("train.py", *args, cwd=tmp_path, timeout=120)
    else:
        result = run_in_process("train.py", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not run_dir.exists()
