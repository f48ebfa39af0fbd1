"""Files the project writes get a new file's mode under the user's umask (0644 under 022, 0600 under
077), as `torch.save` or `cp` give: safetensors' save_file alone makes every file 0600, which kept
teammates and serving accounts from reading best/last/ema, checkpoints and exports."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from data.files import atomic_folder, atomic_write_text, current_umask
from trainer.files.checkpoints import write_json, write_tensors
from trainer.files.model_file import atomic_save_safetensors


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_model_checkpoint_and_text_files_get_the_umask_mode(tmp_path, umask):
    expected = 0o666 & ~umask
    assert current_umask() == umask
    tensors = {"w": torch.zeros(3)}
    atomic_save_safetensors(tensors, tmp_path / "best.safetensors", {"format": "x"})  # best, last, ema
    write_tensors(tmp_path / "model.safetensors", tensors)  # a checkpoint's tensors
    write_json(tmp_path / "state.json", {"step": 1})
    replaced = tmp_path / "config.toml"
    replaced.write_text("old")
    os.chmod(replaced, 0o600)  # as an older version left it
    atomic_write_text(replaced, "new")
    reference = tmp_path / "reference.pt"
    torch.save(tensors, reference)
    assert _mode(reference) == expected
    for name in ("best.safetensors", "model.safetensors", "state.json", "config.toml"):
        assert _mode(tmp_path / name) == expected, (name, oct(_mode(tmp_path / name)))


def test_a_written_folders_files_get_the_umask_mode(tmp_path, umask):
    """The export's folder: model.safetensors written by save_file straight into it."""
    with atomic_folder(tmp_path / "export") as folder:
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
        (folder / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(folder / "sub" / "x.safetensors"))
    for path in (tmp_path / "export" / "model.safetensors", tmp_path / "export" / "sub" / "x.safetensors"):
        assert _mode(path) == 0o666 & ~umask
    assert _mode(tmp_path / "export") == 0o777 & ~umask
