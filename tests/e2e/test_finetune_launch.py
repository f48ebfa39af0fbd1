"""Progressive unfreezing over whole runs: a real 2-process CPU DDP `accelerate launch`, and one
process in-process (the same training function; 1-process `accelerate launch` runs are
test_smoke_train.py's and test_reliability_inputs.py's)."""

import json

import pytest

from helpers import accelerate_launch, reset_accelerate_state, run_script

OVERRIDES = ("model.name=tiny_cnn", "data.image_size=16", "data.batch_size=6", "data.num_workers=0",
             "train.epochs=3", "train.unfreeze_at_epoch=1", "optim.name=sgd", "optim.lr=0.05",
             "optim.backbone_lr_mult=0.1", "data.augment=none")


def _run(tmp_path, image_folder, name, processes):
    run_dir = tmp_path / name
    overrides = (f"data.root={image_folder}", f"run.dir={run_dir}", *OVERRIDES)
    if processes == 1:
        from trainer.assemble.run_config import load_config
        from trainer.fit.loop import train

        reset_accelerate_state()
        try:
            train(load_config(None, [*overrides, "runtime.device=cpu"]))
        finally:
            reset_accelerate_state()
    else:
        launcher = accelerate_launch("--num_processes", str(processes), "--mixed_precision", "no", "--multi_gpu")
        result = run_script("train.py", *overrides, cwd=tmp_path, launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("processes", [1, 2])
def test_progressive_unfreezing_under_accelerate(tmp_path, image_folder, processes):
    history = _run(tmp_path, image_folder, f"p{processes}", processes)
    assert [h["lr_backbone"] for h in history] == pytest.approx([0.0, 0.005, 0.005])
    assert [h["lr"] for h in history] == pytest.approx([0.05] * 3)
    head_params = history[0]["trainable_params"]
    assert history[1]["trainable_params"] == history[2]["trainable_params"] > head_params
    assert history[-1]["train_loss"] < history[0]["train_loss"]
