"""launch/search.py end to end: real drivers starting real `launch/train.py` trials.

Two tests, each as few launches as the cases allow (tiny_cnn, 16 px, 48 training images):
- two drivers at once on one study, one of them running its trials as 2-process CPU DDP runs:
  the study's total is exact, no trial runs twice;
- a driver SIGKILLed mid-trial and started again: the trial resumes from its checkpoint in its
  own folder and is counted once; then a trial whose loss is not finite fails with its one-line
  reason and the search still finishes.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from helpers import PYTHON, REPO, run_env
from trainer.search import study as studies

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY = ("model.name=tiny_cnn", "data.image_size=16", "data.num_workers=0", "runtime.device=cpu",
        "train.best_metric=val_acc", "data.augment=none")
DDP = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"


def driver(tmp_path: Path, images: Path, space: Path, trials: int, *extra: str) -> list[str]:
    return [PYTHON, str(REPO / "launch" / "search.py"), "--space", str(space), "--trials", str(trials),
            "--out", str(tmp_path / "study"), f"data.root={images}", *TINY, *extra]


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env())


def finished(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def read_trials(study_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(study_dir / "trials.csv")))


def epochs_written(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_drivers_share_a_study_one_with_ddp_trials(images, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('[params]\n"optim.lr" = { low = 3e-3, high = 3e-2, log = true }\n')
    common = ("train.epochs=1", "data.batch_size=8")
    plain = start(driver(tmp_path, images, space, 3, *common, "--seed", "1"), tmp_path)
    ddp = start(driver(tmp_path, images, space, 3, *common, "--seed", "2", "--launch", DDP), tmp_path)
    results = [finished(plain), finished(ddp)]
    for code, out, err in results:
        assert code == 0, out[-2000:] + err[-3000:]

    study_dir = tmp_path / "study"
    rows = read_trials(study_dir)
    assert [r["number"] for r in rows] == ["0", "1", "2"]  # exactly the study's total, over both drivers
    assert {r["state"] for r in rows} == {"complete"}
    assert len({r["run_dir"] for r in rows}) == 3
    for row in rows:  # each trial ran once: one command in its log, one epoch in its metrics
        log = (study_dir / "logs" / f"{Path(row['run_dir']).name}.log").read_text()
        assert log.count("\n$ ") + log.startswith("$ ") == 1
        assert epochs_written(Path(row["run_dir"])) == [1]
    ddp_trials = [r for r in rows if "2 process(es)" in (study_dir / "logs" / f"{Path(r['run_dir']).name}.log").read_text()]
    assert ddp_trials, "the DDP driver ran no trial"
    assert "trial" in results[1][1] and "complete" in results[1][1]  # its live table
    best = (study_dir / "best.toml").read_text()
    assert f'dir = "{study_dir / "best"}"' in best
    assert {p.name for p in study_dir.glob("*.png")} == {"optimization_history.png", "param_importances.png",
                                                          "parallel_coordinate.png"}


def seed_for(sequence: list[float]) -> int:
    """A sampler seed whose draws in the killed-and-restarted flow below are `sequence`: the killed
    driver's first trial, then (the retry takes no draw) the restarted driver's next fresh trial
    (its sampler seeded with --seed + the trials the study has)."""
    distribution = {"optim.lr": [0.01, 1e30]}
    for seed in range(50):
        storage = optuna.storages.InMemoryStorage()
        first = optuna.create_study(storage=storage, study_name="s", sampler=studies.make_sampler(seed))
        trial = first.ask()
        drawn = [trial.suggest_categorical("optim.lr", distribution["optim.lr"])]
        again = optuna.create_study(storage=storage, study_name="s", sampler=studies.make_sampler(seed + 1),
                                    load_if_exists=True)
        studies.interrupt(again, storage, storage.get_trial(trial._trial_id), "killed")
        retry = again.ask()
        retry.suggest_categorical("optim.lr", distribution["optim.lr"])
        again.tell(retry, 0.9)
        drawn.append(again.ask().suggest_categorical("optim.lr", distribution["optim.lr"]))
        if drawn == sequence:
            return seed
    pytest.fail(f"no seed below 50 draws {sequence}")


def test_a_killed_driver_resumes_its_trial_and_a_failing_trial_is_recorded(images, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('metric = "val_acc"\n[params]\n"optim.lr" = { choices = [0.01, 1e30] }\n')
    seed = seed_for([0.01, 1e30])
    # 12 steps an epoch, a checkpoint every 2: the kill lands mid-trial, after a checkpoint.
    command = driver(tmp_path, images, space, 2, "train.epochs=2", "data.batch_size=4",
                     "train.checkpoint_every_steps=2", "--seed", str(seed))
    study_dir = tmp_path / "study"
    first = start(command, tmp_path)
    deadline = time.monotonic() + 180
    while not list((study_dir / "trial-0000" / "checkpoints").glob("step-*")):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # the trial gets SIGTERM from the kernel: its clean stop
    first.wait()

    code, out, err = finished(start(command, tmp_path))
    assert code == 0, out[-2000:] + err[-3000:]
    assert "trial 0: its driver stopped; a retry resumes it from its checkpoint" in out
    rows = read_trials(study_dir)
    assert [(r["number"], r["state"]) for r in rows] == [("0", "failed"), ("1", "complete"), ("2", "failed")]
    assert rows[0]["reason"].startswith("its driver stopped")
    # the retry continued in the first trial's folder, from its checkpoint, and trained each epoch once
    assert rows[1]["run_dir"] == rows[0]["run_dir"] == str(study_dir / "trial-0000")
    assert "resumed from" in (study_dir / "logs" / "trial-0000.log").read_text()
    assert epochs_written(study_dir / "trial-0000") == [1, 2] and rows[1]["epochs"] == "2"
    # the failing trial: its one-line reason, and the search went on to write its results
    assert "not finite" in rows[2]["reason"] and "\n" not in rows[2]["reason"]
    assert rows[2]["optim.lr"] == "1e+30"
    assert "lr = 0.01" in (study_dir / "best.toml").read_text()
