"""Day one as a new user meets it (issue 26): the start summary names every setting that changes
training and the end says what best.safetensors holds; one name per metric; the lr column is the
rate the epoch trained with; time lines say what they measure and advice fires only where it means
something; data messages name the fix; old runs resume without hand-set keys and a changed meaning
is noted; recipes leave the machine's choices on auto and the README's launch commands pass what
Accelerate needs (and so do those in docs/ and the launch/ scripts' docstrings)."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import re
import shlex
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from configs.errors import UsageError
from configs.schema import CHANGED_MEANINGS, Config, DataConfig, changed_meaning_notes, dump_toml, read_config
from data.folders import Splits, batch_like_classes, discover
from data.sources import load_splits
from helpers import REPO, make_image_folder
from trainer.fit.restore import adopt_recorded_config, config_changes
from trainer.reporting.console import (ADVICE_WAIT_SECONDS, RunReport, best_file_line, settings_lines, time_spent,
                                       unvalidated_classes)
from trainer.task.best_metric import BestMetric

# ---- 1. the start summary's settings and the end summary's best.safetensors line ----


def _settings(*overrides: str) -> str:
    weights = [o for o in overrides if o.startswith("model.weights=")]  # read_config would look for the file
    tables = read_config(None, ["data.root=x", "model.name=tiny_cnn", *set(overrides) - set(weights)]).to_dict()
    tables["model"]["weights"] = weights[0].split("=")[1] if weights else ""
    return "\n".join(settings_lines(tables, "bf16"))


def test_start_summary_lists_every_setting_that_changes_training():
    text = _settings("train.ema_decay=0.999", "model.drop_path_rate=0.1", "optim.layer_decay=0.75",
                     "runtime.grad_checkpointing=true", "model.bn=frozen", "optim.weight_decay=0.05")
    for shown in ("train.ema_decay=0.999", "train.ema_warmup=true", "model.drop_path_rate=0.1",
                  "optim.layer_decay=0.75", "runtime.grad_checkpointing=true", "model.bn=frozen",
                  "data.task=single", "train.precision=bf16", "optim.no_decay_norm_bias=true",
                  "runtime.sync_bn=false", "train.best_metric=val_loss", "data.mixup_alpha=0.0"):
        assert shown in text, shown


@pytest.mark.parametrize("overrides, shown, hidden", [
    ((), ["optim.name=adamw"], ["optim.momentum", "optim.step_size", "optim.min_lr", "optim.no_decay_norm_bias",
                                "train.ema_warmup", "model.weights"]),
    (("optim.name=sgd", "optim.scheduler=step"), ["optim.momentum=0.9", "optim.nesterov=false", "optim.step_size=7",
                                                  "optim.gamma=0.1"], ["optim.min_lr"]),
    (("optim.scheduler=cosine", "model.weights=w.safetensors"), ["optim.min_lr=0.0", "model.weights=w.safetensors"],
     ["optim.gamma"]),
])
def test_settings_that_do_not_apply_are_left_out(overrides, shown, hidden):
    text = _settings(*overrides)
    assert all(s in text for s in shown) and not any(h in text for h in hidden)


SINGLE = BestMetric("val_acc", True)


@pytest.mark.parametrize("best, chosen_by, said", [
    ({"epoch": 3, "val_acc": 0.5, "val_loss": 0.9, "ema_val_acc": 0.8, "ema_val_loss": 0.4, "best_weights": "ema"},
     SINGLE, "best.safetensors holds the EMA weights of epoch 3, chosen by train.best_metric: ema_val_acc 0.8000 "
             "(higher is better), ema_val_loss 0.4000"),
    ({"epoch": 2, "val_acc": 0.7, "val_loss": 0.5, "ema_val_acc": 0.6, "ema_val_loss": 0.6, "best_weights": "raw"},
     BestMetric("val_loss", False), "best.safetensors holds the raw weights (the EMA's scored no better) of epoch 2, "
                                    "chosen by train.best_metric: val_loss 0.5000 (lower is better), val_acc 0.7000"),
    ({"epoch": 1, "val_acc": 0.7, "val_loss": 0.5}, SINGLE,
     "best.safetensors holds the raw weights of epoch 1, chosen by train.best_metric: val_acc 0.7000 (higher is "
     "better), val_loss 0.5000"),
])
def test_end_summary_says_which_weights_best_safetensors_holds(best, chosen_by, said):
    assert best_file_line(best, chosen_by, "val_acc") == said


# ---- 2. one name per metric ----


def test_the_epoch_table_is_titled_by_the_metrics_jsonl_keys(tmp_path, capsys):
    report = RunReport(SimpleNamespace(is_main_process=True), tmp_path)
    record = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 0.9, "val_acc": 0.6, "ema_val_acc": 0.7,
              "lr": 1e-3, "lr_end": 1e-4, "images_per_sec": 10.0, "epoch_time": 1.0, "is_best": True}
    report.epoch(record)
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "ema_val_acc", "lr", "lr_end",
                      "images_per_sec", "epoch_time"]
    written = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert set(header) <= set(written)  # the same names in the file (and so in W&B: epoch/<key>)


def test_an_older_runs_records_still_read(tmp_path, capsys):
    """The files' names did not change (the table took theirs); records written before lr_end existed
    print and count as before."""
    old = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 0.9, "val_acc": 0.6, "ema_val_acc": 0.7,
           "lr": 1e-3, "images_per_sec": 10.0, "epoch_time": 1.0, "train_seconds": 1.0, "data_wait_seconds": 0.1,
           "is_best": True}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(old) + "\n")
    report = RunReport(SimpleNamespace(is_main_process=True), tmp_path)
    report.continue_after(1)
    report.epoch({**old, "epoch": 2})
    assert "lr_end" not in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert time_spent([old, old], resumed=True).startswith("training time 2.0s (the whole run's")


# ---- 4. and 5. time lines and the input-pipeline advice ----


def _epochs(n: int, seconds: float, waited: float) -> list[dict]:
    return [{"epoch": e, "train_seconds": seconds, "data_wait_seconds": waited} for e in range(1, n + 1)]


@pytest.mark.parametrize("epochs, advice", [
    (_epochs(5, 1.0, 0.6), False),  # 60% waiting on 1-second epochs: worker start-up, not a slow pipeline
    (_epochs(3, 100.0, 50.0), True),  # minutes of waiting
    (_epochs(3, 100.0, 10.0), False),  # 10%: the model is the limit
    (_epochs(40, 1.0, 0.3), True),  # 12 s of waiting in all, 30% of the run
])
def test_pipeline_advice_needs_a_large_share_and_seconds_worth_saving(epochs, advice):
    line = time_spent(epochs)
    assert ("the input pipeline is the limit" in line) == advice
    waited = sum(e["data_wait_seconds"] for e in epochs)
    assert advice == (waited >= ADVICE_WAIT_SECONDS and waited / sum(e["train_seconds"] for e in epochs) > 0.2)


def test_time_lines_say_what_they_measure():
    fresh, resumed = time_spent(_epochs(2, 3.0, 0.0)), time_spent(_epochs(4, 3.0, 0.0), resumed=True)
    assert fresh.startswith("training time 6.0s (this run's: the training steps of 2 epoch(s), without setup and "
                            "validation)")
    assert resumed.startswith("training time 12.0s (the whole run's, before the resume too: the training steps "
                              "of 4 epoch(s)")


# ---- 1., 3., 4. and 6. in one tiny in-process run: the summaries, the lr column, the warnings ----


def test_a_one_epoch_cosine_run_shows_the_rates_it_trained_with(tmp_path, capsys, fresh_accelerate_state):
    from trainer.assemble.run_config import load_config
    from trainer.fit.loop import train

    folder = make_image_folder(tmp_path / "images", per_class=8)
    for extra in sorted((folder / "green").iterdir())[1:]:
        extra.unlink()  # one green image: it trains, and no validation image is left for it
    result = train(load_config(None, [f"data.root={folder}", f"run.dir={tmp_path / 'run'}", "model.name=tiny_cnn",
                                      "data.image_size=16", "data.num_workers=0", "data.batch_size=4",
                                      "optim.scheduler=cosine", "optim.lr=0.01", "train.epochs=1",
                                      "train.ema_decay=0.9", "runtime.device=cpu"]))
    out = capsys.readouterr().out
    epoch = result.history[0]
    assert epoch["lr"] == pytest.approx(0.01)  # the first step's rate, not the schedule's end (0)
    assert 0 < epoch["lr_end"] < epoch["lr"]
    assert "0.00e+00" not in out and "1.00e-02" in out
    assert "train.ema_decay=0.9" in out and "data.task=single" in out and "train.precision=no" in out
    assert re.search(r"best.safetensors holds the (raw|EMA) weights.* of epoch 1, chosen by train.best_metric: "
                     r"(ema_)?val_loss", out)
    assert "warning: 1 class(es) have no validation image: 'green' (1 training); their per-class accuracy" in out
    assert "wall time" in out and "(this process, start to end: setup, training and validation)" in out
    steps = [json.loads(line) for line in (tmp_path / "run" / "train_steps.jsonl").read_text().splitlines()]
    assert steps[0]["lr"] == pytest.approx(0.01)  # each step logs the rate it trained with


# ---- 6. data messages that name the fix ----


def test_a_flat_folder_of_images_says_where_to_point_data_root(tmp_path):
    folder = make_image_folder(tmp_path / "cats", per_class=3, classes=("red",)) / "red"
    with pytest.raises(UsageError) as e:
        discover(folder)
    message = str(e.value)
    assert f"only 3 image files directly in it" in message
    assert f"point data.root at the folder above ({folder.parent})" in message and "beside the other" in message
    assert "data.source=csv data.csv=FILE" in message


@pytest.mark.parametrize("name, command", [
    ("images.zip", "unzip {p} -d {d}/images"),
    ("images.tar.gz", "mkdir -p {d}/images && tar -xf {p} -C {d}/images"),
])
def test_an_archive_as_data_root_says_how_to_unpack_it(tmp_path, name, command):
    path = tmp_path / name
    if name.endswith(".zip"):
        zipfile.ZipFile(path, "w").close()
    else:
        tarfile.open(path, "w:gz").close()
    for source in ("folder", "hf"):
        with pytest.raises(UsageError) as e:
            load_splits(DataConfig(root=str(path), source=source))
        assert f"unpack it first ({command.format(p=path, d=tmp_path)})" in str(e.value), source


@pytest.mark.parametrize("names, warned", [
    (["batch1", "batch2"], True),
    (["Batch_01", "Batch_02", "part-3"], True),
    (["0", "1", "2"], False),  # digits are classes (the demo)
    (["c0", "c1"], False),  # a Kaggle competition's classes
    (["cat", "dog"], False),
    (["batch1"], False),  # one folder: refused as one class anyway
])
def test_class_folders_named_like_batches_get_a_warning(tmp_path, names, warned):
    assert bool(batch_like_classes(tmp_path / "cats", names)) == warned


def test_a_class_folder_given_as_data_root_warns_in_the_splits(tmp_path):
    root = make_image_folder(tmp_path / "cats", per_class=3, classes=("batch1", "batch2"))
    (warning,) = discover(root).warnings
    assert warning.startswith(f"the class folders of {root} (batch1, batch2) are named like batches")
    assert f"point data.root at the folder above ({tmp_path})" in warning


def test_a_val_folder_missing_a_class_says_an_empty_folder_is_accepted(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=3, layout="split-folders")
    for image in (root / "val" / "blue").iterdir():
        image.unlink()
    (root / "val" / "blue").rmdir()
    with pytest.raises(UsageError, match=r"may have an empty folder there \(val/blue/\)"):
        discover(root)
    (root / "val" / "blue").mkdir()
    splits = discover(root)  # accepted, and the start summary names the class
    assert unvalidated_classes(splits.class_counts("train"), splits.class_counts("val")) == [
        "1 class(es) have no validation image: 'blue' (3 training); their per-class accuracy will be nan. Add images "
        "(a split by data.val_fraction needs at least 2 per class to put one in each split; a val/ folder needs at "
        "least one in val/CLASS)"]


def test_a_hugging_face_dataset_is_shown_by_the_name_the_user_gave(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("IMGTRAIN_HF_DIR", str(tmp_path / "hf-cache"))
    folder = make_image_folder(tmp_path / "images", per_class=4)
    rows = sorted(folder.rglob("*.png"))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["blue", "green",
                                                                                                 "red"])})
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in rows],
                                     "label": [["blue", "green", "red"].index(p.parent.name) for p in rows]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "beans"))
    cfg = read_config(None, [f"data.root={tmp_path / 'beans'}", "data.source=hf", "model.name=tiny_cnn"])
    splits = load_splits(cfg.data)
    report = RunReport(SimpleNamespace(is_main_process=True), tmp_path / "run")
    report.start(cfg=cfg, total_params=1, trainable_params=1, splits=splits, notes=[],
                 runtime={"device": "cpu", "num_processes": 1, "precision": "no", "batch_size": 4,
                          "global_batch_size": 4})
    out = capsys.readouterr().out
    assert f"data     {tmp_path / 'beans'} (hf): 3 classes" in out
    assert f"image files in {splits.root}" in out and splits.root.is_relative_to(tmp_path / "hf-cache")
    assert re.search(r"^\s+green\s+train\s+\d+\s+val\s+\d+$", out, flags=re.M)  # the per-class table


# ---- 7. old runs: keys a checkpoint predates, meanings that changed ----


def test_an_older_weight_decay_run_resumes_without_hand_set_keys(tmp_path):
    cfg = read_config(None, ["data.root=x", "model.name=tiny_cnn", "optim.weight_decay=0.05"])
    saved = cfg.to_dict()
    del saved["optim"]["no_decay_norm_bias"]  # written before the key existed: decay on every parameter
    notes = adopt_recorded_config((tmp_path / "step-9", {"config": saved}), cfg)
    assert cfg.optim.no_decay_norm_bias is False
    assert notes == [f"the checkpoint in {tmp_path / 'step-9'} predates optim.no_decay_norm_bias, so it trained with "
                     f"optim.no_decay_norm_bias=False: resuming with that (config.toml records it)"]
    assert config_changes(saved, cfg, ["a"], ["a"]) == []  # and the resume check takes it
    saved["optim"]["no_decay_norm_bias"] = True  # a newer checkpoint records the key: nothing adopted
    fresh = read_config(None, ["data.root=x", "model.name=tiny_cnn", "optim.weight_decay=0.05"])
    assert adopt_recorded_config((tmp_path, {"config": saved}), fresh) == [] and fresh.optim.no_decay_norm_bias


def _written_before_the_change(**data) -> dict:
    """A config.toml as a run of the version before data.min_image_side's change wrote it: every key it had."""
    tables = Config().to_dict()
    for dotted in CHANGED_MEANINGS[0].added_since:
        section, key = dotted.split(".")
        del tables[section][key]
    tables["data"] |= {"root": "x", **data}
    tables["model"]["name"] = "tiny_cnn"
    return tables


@pytest.mark.parametrize("tables, overrides, noted", [
    (_written_before_the_change(image_size=64), (), True),
    (_written_before_the_change(min_image_side=20), (), False),  # another value: its meaning did not change
    (_written_before_the_change(), ("data.min_image_side=0",), True),
    (_written_before_the_change(), ("data.min_image_side=56",), False),  # the user chose
    ({**Config().to_dict(), "data": {**Config().to_dict()["data"], "root": "x"},
      "model": {**Config().to_dict()["model"], "name": "tiny_cnn"}}, (), False),  # written by this version
    ({"data": {"root": "x", "min_image_side": 0}, "model": {"name": "tiny_cnn"}}, (), False),  # written by hand
])
def test_a_changed_meaning_is_noted_when_an_older_config_is_read(tmp_path, tables, overrides, noted):
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(tables))
    cfg = read_config(path, list(overrides))
    assert bool(cfg.read_notes) == noted
    if noted:
        quarter = tables["data"].get("image_size", 224) // 4
        (note,) = cfg.read_notes
        assert note.startswith(f"{path} was written by an earlier version, where data.min_image_side = 0 meant: "
                               f"images with a side under data.image_size // 4 ({quarter} px) were left out")
        assert note.endswith(f"set data.min_image_side={quarter}")
    assert "read_notes" not in cfg.to_dict() and "read_notes" not in cfg.to_toml()


def test_a_changed_meaning_in_a_resumed_checkpoint_is_noted_once(tmp_path):
    saved = _written_before_the_change()
    cfg = read_config(None, ["data.root=x", "model.name=tiny_cnn"])
    notes = adopt_recorded_config((tmp_path, {"config": saved}), cfg)
    assert [n for n in notes if "data.min_image_side = 0 meant" in n] == changed_meaning_notes(
        saved, f"the checkpoint in {tmp_path}", cfg)
    assert len(notes) == 2  # and the key it predates (optim.no_decay_norm_bias)
    cfg.read_notes = ("said by the config file",)
    assert not any("min_image_side" in n for n in adopt_recorded_config((tmp_path, {"config": saved}),
                                                                        cfg))


# ---- 8. recipes and launch commands ----


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_recipes_leave_the_worker_count_to_the_machine(recipe):
    assert read_config(recipe, ["data.root=x"]).data.num_workers == "auto"


def _pages_with_commands() -> dict[str, str]:
    """README.md, every docs/ page and every launch/*.py docstring, by path: where a user copies
    launch commands from."""
    pages = {"README.md": (REPO / "README.md").read_text(encoding="utf-8")}
    pages |= {f"docs/{p.name}": p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").glob("*.md"))}
    for script in sorted((REPO / "launch").glob("*.py")):
        pages[f"launch/{script.name}"] = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    return pages


def _launches(text: str) -> list[list[str]]:
    """The `accelerate launch` arguments of each command in `text` (`\\` continuations joined,
    comments dropped), and of each `launch/search.py --launch "..."` (what every trial passes)."""
    lines = [line.split("#")[0].strip() for line in text.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line)[2:] for line in lines if line.startswith("accelerate launch")]
    trials = [shlex.split(m) + ["launch/train.py"] for line in lines for m in re.findall(r'--launch "([^"]*)"', line)]
    return commands + trials


LAUNCHES = [(page, argv) for page, text in _pages_with_commands().items() for argv in _launches(text)]

def _validate(argv: list[str], caplog) -> str:
    """Accelerate 1.15's own check (`_validate_launch_command`): its warning text for `argv`."""
    from accelerate.commands import launch

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        launch._validate_launch_command(launch.launch_command_parser().parse_args(argv))
    return caplog.text


@pytest.fixture
def two_gpu_launcher(monkeypatch):
    """The launcher as on a 2-GPU machine with no `accelerate config` file: there a multi-process
    command without --multi_gpu is switched to it with a warning, which a CPU machine never shows."""
    import torch
    from accelerate.commands import launch

    monkeypatch.setattr(launch, "default_config_file", str(Path("/nonexistent/default_config.yaml")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("page, argv", [
    pytest.param(page, argv, id=f"{page}:{' '.join(argv)[:60]}")
    for page, argv in LAUNCHES])
def test_launch_commands_pass_what_accelerate_would_default(page, argv, two_gpu_launcher, caplog):
    """Accelerate prints "values were not passed" for each of num_processes, num_machines,
    mixed_precision and dynamo_backend left out (and for a GPU machine's implied --multi_gpu)."""
    assert "values were not passed" not in _validate(argv, caplog), (page, argv, caplog.text)


def test_every_page_with_launch_commands_is_checked(two_gpu_launcher, caplog):
    pages = {page for page, _ in LAUNCHES}
    assert {"README.md", "docs/distributed.md", "docs/configuration.md", "docs/data-sources.md",
            "docs/resume-and-faults.md", "docs/search.md", "launch/make_shards.py", "launch/search.py"} <= pages
    # a continued command is read whole: its flags after the `\\` count
    assert ["--multi_gpu", "--num_processes", "2", "x.py", "--config", "C"] in _launches(
        "accelerate launch --multi_gpu \\\n    --num_processes 2 x.py --config C  # a comment")
    # the check itself sees a command that leaves them out, and a multi-process one without --multi_gpu
    assert "values were not passed" in _validate(["--multi_gpu", "--num_processes", "2", "launch/train.py"], caplog)
    assert "enabling multi-GPU training" in _validate(
        ["--num_machines", "1", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
         "launch/train.py"], caplog)
