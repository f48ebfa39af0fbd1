"""W&B tracking on real training runs (subprocesses, incl. a 2-process accelerate launch): an online
run whose server cannot be reached goes offline with one warning and its offline run files hold
what metrics.jsonl holds; a run that is not logged in goes offline too, keeping a resumed run's id."""

from __future__ import annotations

import json
import socket
import subprocess

from PIL import Image

import wandb_records as wr
from helpers import PYTHON, REPO, accelerate_launch, run_env, run_script

PNGS = ["curves.png", "confusion_matrix.png", "predictions.png", "train_samples.png", "class_distribution.png",
        "top_losses.png"]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def wandb_env(tmp_path, **extra: str) -> dict[str, str]:
    home = tmp_path / "home"
    env = run_env(WANDB_MODE="offline", HOME=str(home), WANDB_CONFIG_DIR=str(home / "wandb-config"),
                  WANDB_CACHE_DIR=str(home / "wandb-cache"), WANDB_DATA_DIR=str(home / "wandb-data"),
                  WANDB_BASE_URL=closed_port_url(), WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def train_args(image_folder, run_dir, *extra: str) -> list[str]:
    return [f"data.root={image_folder}", f"run.dir={run_dir}", "model.name=tiny_cnn", "data.image_size=16",
            "data.batch_size=8", "data.num_workers=0", "train.epochs=2", "train.log_every_steps=1",
            "optim.lr=0.01", "data.val_fraction=0.25", *extra]


def the_run_file(run_dir):
    folders = sorted((run_dir / "wandb").glob("*run-*"))
    assert len(folders) == 1, f"expected exactly one W&B run folder, got {[f.name for f in folders]}"
    (run_file,) = folders[0].glob("run-*.wandb")
    return folders[0], wr.read_records(run_file)


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_pngs_decode(run_dir):
    for name in PNGS:
        with Image.open(run_dir / name) as image:
            image.load()
            assert image.format == "PNG" and image.width > 50 and image.height > 50, name


def test_unreachable_online_run_goes_offline_with_one_warning_and_its_files_match_metrics_jsonl(image_folder,
                                                                                               tmp_path):
    # A key, but the server's port is closed: the online start fails within wandb.init_timeout and the
    # run goes on offline. Everything below is read back from that offline run's files.
    run_dir = tmp_path / "run"
    env = wandb_env(tmp_path, WANDB_MODE=None, WANDB_API_KEY="a" * 40)
    result = run_script("train.py", *train_args(image_folder, run_dir, "wandb.mode=online", "wandb.init_timeout=2",
                                                "wandb.project=proj", "wandb.name=first-try",
                                                "wandb.tags=[\"a\",\"b\"]", "wandb.notes=tiny", "wandb.group=g",
                                                "wandb.log_model=true"),
                        cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: W&B could not start an online run"), \
        result.stderr[-2000:]
    assert "wandb sync" in warnings[0]
    folder, records = the_run_file(run_dir)  # the failed online attempt leaves no second folder
    run = wr.run_record(records)
    assert folder.name.startswith("offline-run-") and folder.name.endswith(run.run_id)
    assert (run.project, run.display_name, list(run.tags), run.notes, run.run_group) == \
        ("proj", "first-try", ["a", "b"], "tiny", "g")
    config = wr.config(records)
    assert config["model"]["name"] == "tiny_cnn" and config["train"]["epochs"] == 2
    assert config["runtime"]["num_processes"] == 1 and config["runtime"]["global_batch_size"] == 8

    rows = wr.history(records)
    # Every metrics.jsonl line is one W&B log call with the same keys and values.
    logged_epochs = [{k.removeprefix("epoch/"): v for k, v in row.items() if k.startswith("epoch")}
                     for row in rows if "epoch/train_loss" in row]
    assert logged_epochs == jsonl(run_dir / "metrics.jsonl")
    for row in rows:
        if "epoch/train_loss" in row:
            assert {"media/predictions/path", "media/confusion_matrix_table/path",
                    "media/per_class_accuracy/path"} <= set(row)
    logged_steps = [{k.removeprefix("train_step/"): v for k, v in row.items() if k.startswith("train_step/")}
                    for row in rows if "train_step/loss" in row]
    steps = jsonl(run_dir / "train_steps.jsonl")
    assert logged_steps == steps and [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert any("images_per_sec" in s for s in steps)
    (samples,) = [row for row in rows if "media/train_samples/path" in row]  # drawn while training starts
    assert samples["epoch"] == 0 and (folder / "files" / samples["media/train_samples/path"]).is_file()
    (mistakes,) = [row for row in rows if "media/label_issues/path" in row]  # at the end: the best epoch's
    assert {"media/top_losses/path", "media/top_losses_table/path", "media/most_confused/path"} <= set(mistakes)

    (artifact,) = [a for a in wr.artifacts(records) if a.type == "model"]
    assert "best" in artifact.aliases
    meta = json.loads(artifact.metadata)
    best_epoch = max(jsonl(run_dir / "metrics.jsonl"), key=lambda r: (r["is_best"], r["epoch"]))["epoch"]
    assert meta["class_names"] == ["blue", "green", "red"] and meta["epoch"] == best_epoch
    assert [f.path for f in artifact.manifest.contents] == ["best.safetensors"]
    assert_pngs_decode(run_dir)


def test_two_processes_make_one_wandb_run_and_one_set_of_files(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("train.py", *train_args(image_folder, run_dir, "wandb.mode=offline"), cwd=tmp_path,
                        launcher=accelerate_launch("--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"),
                        env=wandb_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    _, records = the_run_file(run_dir)
    assert wr.config(records)["runtime"]["num_processes"] == 2
    assert len(jsonl(run_dir / "metrics.jsonl")) == 2
    assert result.stdout.count("wandb    offline run") == 1
    # The confusion matrix covers every validation image once, gathered from both processes.
    per_class = (run_dir / "per_class_accuracy.csv").read_text().splitlines()[1:]
    assert sum(int(line.split(",")[2]) for line in per_class) == 9 == jsonl(run_dir / "metrics.jsonl")[-1]["val_images"]
    assert_pngs_decode(run_dir)
    assert sorted(p.name for p in run_dir.glob("*.png")) == sorted(PNGS)


def test_not_logged_in_goes_offline_with_one_warning_and_keeps_the_run_id_for_resume(tmp_path, image_folder):
    # What a resumed run does: start tracking with the id stored in its training state; online asked
    # for, but no key: one warning, and the run goes on offline under that id.
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from trainer.assemble.run_config import load_config\nfrom trainer.assemble.accelerator import make_accelerator\n"
        "from trainer.reporting.tracking import RunTracking, wandb_trackers\n"
        "cfg = load_config(None, [f'data.root={sys.argv[2]}', f'run.dir={sys.argv[3]}', 'model.name=tiny_cnn',"
        " 'wandb.mode=online', 'wandb.init_timeout=2'])\n"
        "acc = make_accelerator(cfg, trackers=wandb_trackers(cfg))\n"
        "tracking = RunTracking(acc, cfg, __import__('pathlib').Path(sys.argv[3]), ['a'], __import__('data').Preprocessing(16, 1.0, (0.5,)*3, (0.5,)*3))\n"
        "print('ID', tracking.start(config=cfg.to_dict(), run_id=sys.argv[4]))\nacc.end_training()\n")
    result = subprocess.run([PYTHON, "-c", script, str(REPO), str(image_folder), str(tmp_path / "run"), "resum3me"],
                            capture_output=True, text=True, timeout=120,
                            env=wandb_env(tmp_path, WANDB_MODE=None, WANDB_API_KEY=None))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ID resum3me" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1 and "is not logged in" in warnings[0] and "wandb sync" in warnings[0], \
        result.stderr[-2000:]
    folder, records = the_run_file(tmp_path / "run")
    assert folder.name.startswith("offline-run-")
    assert wr.run_record(records).run_id == "resum3me"
