"""The search's parts in-process: the space file and its checks, the study's budget and retries,
the pruning decision from a metrics.jsonl being written, trials.csv and best.toml (no trial runs;
tests/e2e/test_search.py runs real ones)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from configs.errors import ConfigError
from helpers import REPO, run_in_process
from trainer.search import study as studies
from trainer.search.results import LiveTable, run_folder, write_best_config, write_trials_csv
from trainer.search.space import Param, check_space, override_text, parse_param, read_space
from trainer.search.trial_run import EpochReports, MetricsTail, TrialLaunch, failure_line, outcome_of, parse_launch

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("spec, expected", [
    ({"low": 1e-4, "high": 3e-2, "log": True}, Param("optim.lr", 1e-4, 3e-2, log=True)),
    ({"low": 2, "high": 6}, Param("optim.lr", 2, 6)),
    ({"low": 0.0, "high": 0.1, "step": 0.02}, Param("optim.lr", 0.0, 0.1, step=0.02)),
    ({"choices": [1e-3, 1e-2]}, Param("optim.lr", choices=(1e-3, 1e-2))),
    ({"around": 3e-3, "factor": 10}, Param("optim.lr", 3e-4, 3e-2, log=True)),
])
def test_param_forms(spec, expected):
    param = parse_param("optim.lr", spec)
    assert param.key == expected.key and param.log == expected.log and param.choices == expected.choices
    assert param.low == pytest.approx(expected.low) and param.high == pytest.approx(expected.high)


def test_ints_when_both_ends_are_ints():
    assert parse_param("train.epochs", {"low": 2, "high": 6}).is_int
    assert not parse_param("optim.lr", {"low": 1, "high": 2.5}).is_int


@pytest.mark.parametrize("key, spec, message", [
    ("optim.lrr", {"low": 1, "high": 2}, "unknown config key; did you mean 'optim.lr'?"),
    ("optim.lr", {"low": 0.1, "high": 0.01}, "the range 0.1 .. 0.01 is empty"),
    ("optim.lr", {"low": 0.1, "high": 0.1}, "is empty; low must be below high"),
    ("optim.lr", {"low": 0, "high": 1, "log": True}, "a log range needs low > 0"),
    ("optim.lr", {"low": 1e-3}, "'low and high' is not a form"),
    ("optim.lr", {"low": 1e-3, "high": 1, "logg": True}, "'logg' is not a form"),
    ("optim.lr", {"low": "a", "high": 1}, "low must be a number"),
    ("optim.lr", {"choices": []}, "choices must be a non-empty list"),
    ("optim.lr", {"choices": [1, 1]}, "repeat a value"),
    ("optim.lr", {"choices": [1], "log": True}, "'log' does not go with choices"),
    ("optim.lr", {"around": 1e-3, "factor": 1}, "factor above 1"),
    ("optim.lr", 0.01, "must be a table"),
    ("run.dir", {"choices": ["a", "b"]}, "the search sets run.dir for each trial itself"),
])
def test_bad_params_are_one_line_naming_the_key(key, spec, message):
    with pytest.raises(ConfigError) as e:
        parse_param(key, spec, "s.toml")
    assert message in str(e.value) and f"[params] {key!r} in s.toml" in str(e.value)
    assert "\n" not in str(e.value)


def write_space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


ISSUE_SPACE = '''metric = "val_acc"
[params]
"optim.lr" = { low = 1e-4, high = 3e-2, log = true }
"optim.backbone_lr_mult" = { low = 0.01, high = 1.0, log = true }
"train.epochs" = { low = 2, high = 6 }
"data.augment" = { choices = ["standard", "crop", "trivialaugment"] }
'''


def test_the_issue_space_file_reads_and_checks(tmp_path, image_folder):
    space = read_space(write_space(tmp_path, ISSUE_SPACE), "single", "val_loss")
    assert space.keys == ["optim.lr", "optim.backbone_lr_mult", "train.epochs", "data.augment"]
    assert space.metric.key == "val_acc" and space.metric.higher_is_better and space.pruner == "median"
    check_space(space, None, [f"data.root={image_folder}", "model.name=tiny_cnn"])


@pytest.mark.parametrize("metric, side", [("val_acc", "_lower"), ("val_loss", "_upper")])
def test_the_worse_than_pruner_prunes_on_the_metrics_bad_side(tmp_path, metric, side):
    space = read_space(write_space(tmp_path, f'metric = "{metric}"\npruner = {{ worse_than = 0.5 }}\n'
                                             '[params]\n"optim.lr" = { low = 1e-3, high = 1e-2 }\n'), "single", "val_loss")
    assert (space.pruner, space.worse_than, space.pruner_text) == ("threshold", 0.5, "worse_than 0.5")
    pruner = studies.make_pruner(space, startup_trials=3)
    assert isinstance(pruner, optuna.pruners.ThresholdPruner) and getattr(pruner, side) == 0.5
    # it judges the very first trial at its first epoch: no other trial needed
    study = optuna.create_study(direction="maximize" if metric == "val_acc" else "minimize", pruner=pruner)
    trial = study.ask()
    trial.report(0.4 if metric == "val_acc" else 0.6, 1)
    assert trial.should_prune()


def test_metric_defaults_to_the_configs_best_metric(tmp_path):
    space = read_space(write_space(tmp_path, '[params]\n"optim.lr" = { low = 1e-3, high = 1e-2 }\n'),
                       "single", "val_loss")
    assert space.metric.key == "val_loss" and not space.metric.higher_is_better


@pytest.mark.parametrize("text, message", [
    ('metrc = "val_acc"\n[params]\n"optim.lr" = {low = 1e-3, high = 1e-2}\n', "unknown key 'metrc'"),
    ('metric = "val_acc"\n', "has no [params] table"),
    ('pruner = "asha"\n[params]\n"optim.lr" = {low = 1e-3, high = 1e-2}\n', "is not one of: 'median', 'hyperband', 'none'"),
    ('pruner = { below = 0.2 }\n[params]\n"optim.lr" = {low = 1e-3, high = 1e-2}\n', "the table form is { worse_than"),
    ('pruner = { worse_than = "a" }\n[params]\n"optim.lr" = {low = 1e-3, high = 1e-2}\n', "the table form is"),
    ('metric = "val_map"\n[params]\n"optim.lr" = {low = 1e-3, high = 1e-2}\n', "not a metric of data.task = single"),
    ('[params\n', "is not valid TOML"),
])
def test_bad_space_files(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        read_space(write_space(tmp_path, text), "single", "val_loss")
    assert message in str(e.value)


@pytest.mark.parametrize("line, message", [
    ('"data.augment" = { choices = ["crop", "bogus"] }', "'data.augment' in"),
    ('"train.epochs" = { low = 0, high = 3 }', "value 0 is refused"),
    ('"optim.name" = { choices = ["adamw", "lion"] }', "value 'lion' is refused"),
    ('"train.epochs" = { low = 1.5, high = 3.0 }', "train.epochs must be an integer"),
])
def test_values_the_schema_refuses_are_found_before_any_trial(tmp_path, image_folder, line, message):
    space = read_space(write_space(tmp_path, f"[params]\n{line}\n"), "single", "val_loss")
    with pytest.raises(ConfigError) as e:
        check_space(space, None, [f"data.root={image_folder}", "model.name=tiny_cnn"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_override_text_is_what_a_run_parses():
    assert override_text("optim.lr", 0.001) == "optim.lr=0.001"
    assert override_text("data.augment", "crop") == "data.augment=crop"
    assert override_text("optim.nesterov", True) == "optim.nesterov=true"
    assert override_text("train.epochs", 3) == "train.epochs=3"


def test_the_script_refuses_a_bad_space_before_writing_anything(tmp_path, image_folder):
    space = write_space(tmp_path, '[params]\n"optim.lr" = { low = 0.1, high = 0.01 }\n')
    out = tmp_path / "study"
    r = run_in_process("search.py", "--space", str(space), "--trials", "2", "--out", str(out),
                       f"data.root={image_folder}", "model.name=tiny_cnn", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "is empty" in r.stderr and not out.exists()
    r = run_in_process("search.py", "--space", str(space), "--trials", "2", "--out", str(out),
                       f"data.root={image_folder}", "run.dir=x", cwd=tmp_path)
    assert r.returncode == 2 and "run.dir is set by the search" in r.stderr and not out.exists()


def test_the_driver_imports_no_torch():
    script = "import sys; import trainer.search.driver; print([m for m in ('torch', 'accelerate') if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stderr[-2000:]


# ---- the study: budget, surplus, retries ----

LR = FloatDistribution(1e-4, 1e-1, log=True)


def add(study, state, value=None, number_lr=0.01, **system_attrs):
    study.add_trial(create_trial(state=state, value=value, params={"optim.lr": number_lr},
                                 distributions={"optim.lr": LR}, system_attrs=system_attrs))


def test_budget_counts_fresh_trials_and_retries_take_their_place():
    study = optuna.create_study(direction="maximize")
    add(study, TrialState.COMPLETE, 0.5)
    add(study, TrialState.FAIL)                                    # 1: interrupted, retried by 2
    add(study, TrialState.COMPLETE, 0.7, failed_trial=1)           # 2: the retry
    trials = study.get_trials()
    assert studies.budget_left(trials, 3) and not studies.budget_left(trials, 2)
    add(study, TrialState.RUNNING)                                 # 3: the third fresh trial
    add(study, TrialState.RUNNING)                                 # 4: asked at the same moment: surplus at 3
    trials = study.get_trials()
    assert [studies.is_surplus(t, trials, 3) for t in trials] == [False, False, False, False, True]
    assert studies.first_number(trials[2]) == 1 and studies.first_number(trials[3]) == 3
    add(study, TrialState.WAITING, failed_trial=3)                 # a waiting retry is work left
    assert studies.budget_left(study.get_trials(), 3)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_dead_drivers_trial_is_failed_once_and_retried_in_its_folder():
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="maximize")
    me = studies.driver_identity()
    add(study, TrialState.RUNNING, **{studies.DRIVER: {**me, "pid": dead_pid()}})
    add(study, TrialState.RUNNING, **{studies.DRIVER: me})  # this driver's own: alive
    assert studies.retry_orphans(study, storage, stale_after=120) == [0]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert "its driver stopped" in trials[0].user_attrs[studies.REASON]
    assert studies.first_number(trials[2]) == 0 and trials[2].params == trials[0].params
    assert run_folder(Path("out"), trials[2]) == Path("out/trial-0000")
    assert studies.retry_orphans(study, storage, stale_after=120) == []  # failed now: not again
    assert not studies.interrupt(study, storage, trials[0], "again")     # the claim is made once
    assert len(study.get_trials()) == 3


def test_another_hosts_trial_is_judged_by_its_heartbeat_or_its_start():
    import datetime
    import time

    def running(started_ago: float, **attrs):
        start = datetime.datetime.now() - datetime.timedelta(seconds=started_ago)
        return optuna.trial.FrozenTrial(number=0, state=TrialState.RUNNING, value=None, datetime_start=start,
                                        datetime_complete=None, params={}, distributions={}, user_attrs={},
                                        system_attrs=attrs, intermediate_values={}, trial_id=0)

    other = {studies.DRIVER: {"host": "elsewhere", "pid": 1}}
    assert studies.driver_alive(running(500, **other, **{studies.HEARTBEAT: time.time() - 10}), stale_after=120)
    assert not studies.driver_alive(running(500, **other, **{studies.HEARTBEAT: time.time() - 200}), stale_after=120)
    assert studies.driver_alive(running(1), stale_after=120)  # just asked for: its driver has not said who it is
    assert not studies.driver_alive(running(500), stale_after=120)


# ---- following a trial's metrics ----

def test_pruning_decision_from_a_metrics_file_being_written(tmp_path):
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1))
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.9, params={"optim.lr": 0.01},
                                 distributions={"optim.lr": LR}, intermediate_values={1: 0.8, 2: 0.9}))
    trial = study.ask()
    trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
    path = tmp_path / "metrics.jsonl"
    tail, reports = MetricsTail(path), EpochReports(trial, "val_acc", {})
    assert tail.new_records() == []  # not written yet
    with open(path, "w") as f:
        f.write(json.dumps({"epoch": 1, "val_acc": 0.85}) + "\n" + '{"epoch": 2, "val_a')  # a line half written
    decisions = [reports.add(r) for r in tail.new_records()]
    assert decisions == [False]  # above the median at epoch 1
    with open(path, "a") as f:
        f.write('cc": 0.5}\n')
    assert [reports.add(r) for r in tail.new_records()] == [True]  # 0.5 < 0.9 at epoch 2
    assert reports.best(higher_is_better=True) == 0.85
    # a resumed run's file read again from the start reports nothing twice
    again = EpochReports(trial, "val_acc", {1: 0.85, 2: 0.5})
    assert [again.add(r) for r in MetricsTail(path).new_records()] == [True, True]
    assert study.get_trials()[-1].intermediate_values == {1: 0.85, 2: 0.5}


def test_outcomes_and_the_failure_line(tmp_path):
    log = tmp_path / "trial.log"
    log.write_text("epoch 1 ...\nerror: the loss is not finite (nan) at epoch 1, step 3: lower optim.lr\n")
    reports = EpochReports(None, "val_acc", {})
    failed = outcome_of(1, False, reports, True, tmp_path, log)
    assert failed.state == "failed" and failed.reason.startswith("the loss is not finite (nan)")
    assert failure_line(-9, tmp_path / "missing.log") == "killed by SIGKILL"
    reports.values = {1: 0.5, 2: 0.7}
    assert outcome_of(0, False, reports, True, tmp_path, log).value == 0.7
    assert outcome_of(75, True, reports, True, tmp_path, log).state == "pruned"


def test_trial_commands():
    launch = TrialLaunch("c.toml", ["data.root=d"])
    command = launch.command({"optim.lr": 0.01, "data.augment": "crop"}, Path("/s/trial-0003"), resume=True)
    assert command[0] == sys.executable and command[1].endswith("launch/train.py")
    assert command[2:] == ["--config", "c.toml", "data.root=d", "optim.lr=0.01", "data.augment=crop",
                           "run.dir=/s/trial-0003", "run.resume=auto", "wandb.name=trial-0003"]
    ddp = TrialLaunch(None, [], parse_launch("accelerate launch --multi_gpu --num_processes 2"), wandb_group="s")
    command = ddp.command({}, Path("/s/trial-0000"), resume=False)
    assert command[1:4] == ["launch", "--multi_gpu", "--num_processes"] and "--main_process_port" in command
    assert command[-2:] == ["wandb.group=s", "wandb.name=trial-0000"]


# ---- results ----

def test_trials_csv_and_best_toml(tmp_path):
    study = optuna.create_study(direction="maximize")
    for lr, state, value, epochs in ((0.01, TrialState.COMPLETE, 0.8, 3), (0.05, TrialState.PRUNED, None, 1),
                                     (0.002, TrialState.COMPLETE, 0.9, 3), (0.1, TrialState.FAIL, None, 0)):
        study.add_trial(create_trial(state=state, value=value, params={"optim.lr": lr},
                                     distributions={"optim.lr": LR}, intermediate_values={1: 0.3},
                                     user_attrs={"epochs": epochs, **({studies.REASON: "the loss is not finite"}
                                                                      if state == TrialState.FAIL else {})}))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"optim.lr": 0.01}, distributions={"optim.lr": LR},
                                 system_attrs={studies.SURPLUS: True}))
    write_trials_csv(tmp_path / "trials.csv", study.trials, ["optim.lr"], tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert [(r["number"], r["state"], r["value"], r["epochs"]) for r in rows] == [
        ("0", "complete", "0.8", "3"), ("1", "pruned", "0.3", "1"), ("2", "complete", "0.9", "3"),
        ("3", "failed", "0.3", "0")]
    assert rows[3]["reason"] == "the loss is not finite" and rows[0]["reason"] == ""
    assert rows[2]["optim.lr"] == "0.002" and rows[2]["run_dir"] == str(tmp_path / "trial-0002")

    trial_dir = tmp_path / "trial-0002"
    trial_dir.mkdir()
    (trial_dir / "config.toml").write_text('[optim]\nlr = 0.002\n\n[run]\ndir = "x"\nresume = "auto"\n\n'
                                           '[wandb]\nname = "trial-0002"\n')
    write_best_config(tmp_path / "best.toml", study.best_trial, tmp_path, "val_acc")
    text = (tmp_path / "best.toml").read_text()
    best = tomllib.loads(text)
    assert best["optim"]["lr"] == 0.002 and best["run"] == {"dir": str(tmp_path / "best"), "resume": ""}
    assert best["wandb"]["name"] == "" and "trial 2, val_acc 0.9" in text

    table = LiveTable(["optim.lr"], "val_acc")
    assert "optim.lr" in table.header()
    assert "the loss is not finite" in table.row(study.trials[3], 0.9)


def test_a_retry_best_toml_is_the_trials_config_not_the_retrys(tmp_path, image_folder):
    """The best trial is a retry (its driver was killed): its folder's config.toml is the one the
    resumed run wrote, with the retry's run.resume=auto. best.toml must still load to the config the
    trial was started with, but for its own run folder."""
    from trainer.assemble.run_config import load_config

    launch = TrialLaunch(None, [f"data.root={image_folder}", "model.name=tiny_cnn"], wandb_group="study")
    folder, params = tmp_path / "trial-0000", {"optim.lr": 0.004}
    first = load_config(None, launch.command(params, folder, resume=False)[2:])
    retried = load_config(None, launch.command(params, folder, resume=True)[2:])
    assert retried.run.resume == "auto"
    folder.mkdir()
    (folder / "config.toml").write_text(retried.to_toml())  # what the resumed run wrote over the first

    study = optuna.create_study(direction="maximize")
    add(study, TrialState.FAIL, number_lr=0.004)                              # 0: its driver was killed
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.9, params=params, distributions={"optim.lr": LR},
                                 system_attrs={studies.RETRIED: 0}))         # 1: the retry, in trial-0000
    write_best_config(tmp_path / "best.toml", study.best_trial, tmp_path, "val_acc")
    best = load_config(tmp_path / "best.toml")
    expected = first.to_dict()
    expected["run"] = {"dir": str(tmp_path / "best"), "resume": ""}
    expected["wandb"]["name"] = ""
    assert best.to_dict() == expected
    assert "trial 1 (continuing trial 0 in its folder)" in (tmp_path / "best.toml").read_text()


def test_a_relative_out_is_written_absolute(tmp_path, image_folder, monkeypatch):
    """--out runs/x: trials.csv and best.toml name absolute folders, so they work from anywhere."""
    from trainer.search.driver import SearchOptions, search

    out = tmp_path / "study"
    storage = studies.open_storage(out, None)
    study = optuna.create_study(storage=storage, study_name="study", direction="maximize")
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.9, params={"optim.lr": 0.004},
                                 distributions={"optim.lr": LR}))
    (out / "trial-0000").mkdir()
    (out / "trial-0000" / "config.toml").write_text('[optim]\nlr = 0.004\n\n[run]\ndir = "study/trial-0000"\n')
    space = write_space(tmp_path, 'metric = "val_acc"\n'
                                  '[params]\n"optim.lr" = { low = 1e-4, high = 1e-1, log = true }\n')
    monkeypatch.chdir(tmp_path)
    # --trials 0: no trial runs; the results are written from the study
    assert search(SearchOptions(config=None, space="space.toml", trials=0, out_dir=Path("study"),
                                overrides=[f"data.root={image_folder}", "model.name=tiny_cnn"])) == 0
    (row,) = csv.DictReader(open(out / "trials.csv"))
    assert row["run_dir"] == str(out / "trial-0000")
    assert tomllib.loads((out / "best.toml").read_text())["run"]["dir"] == str(out / "best")
    assert space.is_file()


# ---- stopping a trial: its training processes, nothing else ----

TREE = '''
import os, signal, subprocess, sys, time
from pathlib import Path
out, role = Path(sys.argv[1]), sys.argv[2]
def mark(signum, frame):
    (out / f"{role}-{os.getpid()}").write_text("")
    if role != "launcher":  # a launcher told to stop waits for its ranks
        sys.exit(75 if role != "worker" else 0)
signal.signal(signal.SIGTERM, mark)
if role == "launcher":
    # two ranks, each with a worker; it ends when they do
    ranks = [subprocess.Popen([sys.executable, __file__, str(out), "rank"]) for _ in range(2)]
    sys.exit(max(r.wait() for r in ranks))
if role in ("rank", "run"):
    subprocess.Popen([sys.executable, __file__, str(out), "worker"])
(out / f"ready-{role}-{os.getpid()}").write_text("")
time.sleep(60)
'''


def start_tree(tmp_path: Path, role: str, ready: int) -> subprocess.Popen:
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path), role], start_new_session=True)
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("ready-*"))) < ready:
        assert time.monotonic() < deadline, "the process tree did not start"
        time.sleep(0.05)
    return child


def signalled(tmp_path: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.split("-")[0] in
                  ("launcher", "rank", "run", "worker"))


def test_stop_signals_the_ranks_not_the_launcher_nor_their_workers(tmp_path):
    import signal as signals

    from trainer.search.trial_run import stop

    child = start_tree(tmp_path, "launcher", ready=4)  # 2 ranks, 2 workers
    stop(child, launcher=True)
    assert child.wait(timeout=30) == 75  # the launcher ended because its ranks did
    assert signalled(tmp_path) == ["rank", "rank"]
    for worker in tmp_path.glob("ready-worker-*"):  # the workers were left to their parents
        os.kill(int(worker.name.split("-")[-1]), signals.SIGKILL)


def test_stop_signals_a_plain_run_and_not_its_workers(tmp_path):
    import signal as signals

    from trainer.search.trial_run import is_launcher, stop

    child = start_tree(tmp_path, "run", ready=2)
    stop(child, launcher=False)
    assert child.wait(timeout=30) == 75 and signalled(tmp_path) == ["run"]
    for worker in tmp_path.glob("ready-worker-*"):
        os.kill(int(worker.name.split("-")[-1]), signals.SIGKILL)
    assert is_launcher(TrialLaunch(None, [], ["--num_processes", "2"]).command({}, tmp_path, False))
    assert not is_launcher(TrialLaunch(None, []).command({}, tmp_path, False))
