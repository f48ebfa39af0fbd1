"""launch/search.py end to end: real drivers starting real `launch/train.py` trials.

Two tests, each as few launches as the cases allow (tiny_cnn, 16 px, 48 training images):
- two drivers at once on one study, one of them running its trials as 2-process CPU DDP runs
  that its pruner stops at their first epoch: the study's total is exact, no trial runs twice, a
  pruned DDP trial stops through the run's own clean stop with no rank left and resumes; with W&B
  on (offline), every trial is a run in one group named after the study;
- a driver SIGKILLed mid-trial and started again: the trial resumes from its checkpoint in its
  own folder and is counted once; then a trial whose loss is not finite fails with its one-line
  reason and the search still finishes.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest

import wandb_records as wr
from helpers import PYTHON, REPO, free_port, run_env, run_in_process
from trainer.search import study as studies

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY = ("model.name=tiny_cnn", "data.image_size=16", "data.num_workers=0", "runtime.device=cpu",
        "train.best_metric=val_acc", "data.augment=none")
DDP = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"


def driver(tmp_path: Path, images: Path, space: Path, trials: int, *extra: str) -> list[str]:
    return [PYTHON, str(REPO / "launch" / "search.py"), "--space", str(space), "--trials", str(trials),
            "--out", str(tmp_path / "study"), f"data.root={images}", *TINY, *extra]


def start(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or run_env())


def finished(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def read_trials(study_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(study_dir / "trials.csv")))


def epochs_written(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_offline_env(tmp_path: Path) -> dict[str, str]:
    """W&B offline, turned on by the environment alone (no wandb.mode in the config), every folder
    of its own in tmp, and a server address nothing listens on."""
    home = tmp_path / "home"
    env = run_env(WANDB_MODE="offline", HOME=str(home), WANDB_DIR=str(tmp_path / "wandb"),
                  WANDB_CONFIG_DIR=str(home / "wandb-config"), WANDB_CACHE_DIR=str(home / "wandb-cache"),
                  WANDB_DATA_DIR=str(home / "wandb-data"), WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}")
    env.pop("WANDB_API_KEY", None)
    return env


def wandb_records_of(run_dir: Path) -> list:
    """The records of the trial's one offline W&B run."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return wr.read_records(run_file)


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (a trial's run folder: its launcher, its ranks)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended while we looked
        if text in line:
            found.append(line)
    return found


def test_two_drivers_share_a_study_one_with_ddp_trials_that_get_pruned(images, tmp_path):
    space = tmp_path / "space.toml"
    # No accuracy reaches 1.01: the pruner stops every trial at its first epoch, unless that epoch
    # is its last. The plain driver's trials have 1 epoch (complete), the DDP driver's 20 (pruned
    # at epoch 1, through SIGTERM to the `accelerate launch` process group).
    space.write_text('metric = "val_acc"\npruner = { worse_than = 1.01 }\n'
                     '[params]\n"optim.lr" = { low = 3e-3, high = 3e-2, log = true }\n')
    env = wandb_offline_env(tmp_path)
    plain = start(driver(tmp_path, images, space, 3, "data.batch_size=8", "train.epochs=1", "--seed", "1"),
                  tmp_path, env)
    # Its ranks load with a DataLoader worker each: the stop must reach the ranks and not their workers.
    ddp = start(driver(tmp_path, images, space, 3, "data.batch_size=8", "train.epochs=20", "data.num_workers=1",
                       "--seed", "2", "--launch", DDP), tmp_path, env)
    results = [finished(plain), finished(ddp)]
    for code, out, err in results:
        assert code == 0, out[-2000:] + err[-3000:]

    study_dir = tmp_path / "study"
    rows = read_trials(study_dir)
    assert [r["number"] for r in rows] == ["0", "1", "2"]  # exactly the study's total, over both drivers
    assert len({r["run_dir"] for r in rows}) == 3
    logs = {r["number"]: (study_dir / "logs" / f"{Path(r['run_dir']).name}.log").read_text() for r in rows}
    for row in rows:  # each trial ran once: one command in its log
        assert logs[row["number"]].count("\n$ ") + logs[row["number"]].startswith("$ ") == 1
    ddp_rows = [r for r in rows if "2 process(es)" in logs[r["number"]]]
    plain_rows = [r for r in rows if r not in ddp_rows]
    assert ddp_rows and plain_rows, "each driver runs at least its first trial"
    for row in plain_rows:
        assert row["state"] == "complete" and epochs_written(Path(row["run_dir"])) == [1]
    for row in ddp_rows:  # pruned: the run's own clean stop on the ranks, its checkpoint kept
        run_dir, log = Path(row["run_dir"]), logs[row["number"]]
        epochs = epochs_written(run_dir)
        assert row["state"] == "pruned" and row["epochs"] == str(len(epochs)) and epochs[:1] == [1]
        stopped = re.search(r"stopped by signal SIGTERM after step \d+; checkpoint (\S+); exit code 75", log)
        assert stopped and len(epochs) < 20, log[-3000:]
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == Path(stopped[1]).name
        assert re.search(r"exitcode\s*:\s*75", log)  # torch elastic's report of the rank that ended first
        assert "DataLoader worker" not in log and "forcefully exiting" not in log
        assert processes_naming(f"run.dir={run_dir}") == []  # the launcher and every rank have ended
    assert "pruned" in results[1][1]  # the DDP driver's live table
    # W&B: every trial a run named after its folder, in one group named after the study
    for row in rows:
        run = wr.run_record(wandb_records_of(Path(row["run_dir"])))
        assert (run.run_group, run.display_name) == ("study", Path(row["run_dir"]).name)
    best = (study_dir / "best.toml").read_text()
    assert f'dir = "{study_dir / "best"}"' in best
    assert {p.name for p in study_dir.glob("*.png")} == {"optimization_history.png", "param_importances.png",
                                                          "parallel_coordinate.png"}

    # A pruned DDP trial is resumable: run.resume=auto in its folder continues from the stop's
    # checkpoint (here in this process, with one process, for one more epoch).
    run_dir = Path(ddp_rows[0]["run_dir"])
    done = len(epochs_written(run_dir))
    r = run_in_process("train.py", "--config", str(run_dir / "config.toml"), "run.resume=auto",
                       f"train.epochs={done + 1}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert epochs_written(run_dir) == list(range(1, done + 2))


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
