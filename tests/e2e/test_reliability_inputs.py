"""Config surprises where the launch itself is the point, as real processes: the precision a run
records and re-runs with under `accelerate launch`, and pretrained weights on a machine without
network. (Bad weights files, small images and an audit of empty classes run as processes in
test_reliability.py; the messages themselves are unit-tested in tests/unit.)"""

from __future__ import annotations

import time

from helpers import accelerate_launch, make_image_folder, run_env, run_script
from trainer.files.model_file import read_metadata

TINY = ["model.name=tiny_cnn", "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=1",
        "data.audit=off", "runtime.device=cpu"]


def _note_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("note: train.precision")]


def test_the_run_records_the_precision_that_ran_and_a_rerun_from_its_config_says_which_setting_won(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=4)
    first = tmp_path / "first"
    # The launcher asks for bf16, the config says auto: bf16 runs, and config.toml says bf16, not auto.
    result = run_script("train.py", f"data.root={root}", f"run.dir={first}", *TINY, "train.precision=auto",
                        cwd=tmp_path, launcher=accelerate_launch("-q", "--num_processes", "1", "--mixed_precision", "bf16"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'precision = "bf16"' in (first / "config.toml").read_text().splitlines()
    assert read_metadata(first / "best.safetensors")["runtime"]["precision"] == "bf16"
    assert _note_lines(result) == []  # auto follows the launcher: nothing disagrees

    # Re-run from that file under a launcher that says fp16: the file's bf16 wins, in one line.
    second = tmp_path / "second"
    result = run_script("train.py", "--config", str(first / "config.toml"), f"run.dir={second}", cwd=tmp_path,
                        launcher=accelerate_launch("-q", "--num_processes", "1", "--mixed_precision", "fp16"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert _note_lines(result) == ["note: train.precision = 'bf16' (config) wins over accelerate launch "
                                   "--mixed_precision fp16; set train.precision=auto to follow the launcher"]
    assert read_metadata(second / "best.safetensors")["runtime"]["precision"] == "bf16"


def test_pretrained_weights_without_network_is_one_line_in_seconds(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=4)
    # HF_HUB_OFFLINE: no request leaves the process; an empty HF_HOME: nothing cached.
    env = run_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    started = time.perf_counter()
    result = run_script("train.py", f"data.root={root}", f"run.dir={tmp_path / 'run'}", *TINY,
                        "model.name=timm/test_vit", "model.pretrained=true", cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2
    assert time.perf_counter() - started < 30  # was 52 s of retries, then a 78-line traceback
    assert result.stderr == ("error: could not fetch timm/test_vit's pretrained weights: HF_HUB_OFFLINE is set and the "
                             "weights are not in the cache. Offline, give the weights as a file (model.weights=FILE "
                             "model.pretrained=false), or set HF_HOME to a cache that holds them\n")
    assert not (tmp_path / "run").exists()
