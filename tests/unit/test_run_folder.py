"""A run writes only into a folder that is its own: new, empty, or a run folder (its marker, or an
older version's shape). Everything else is one line and nothing written: a user's folder, `/`,
the home folder, an empty run.dir, the data folder or a folder inside it, the CSV's folder."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from configs.errors import ConfigError, UsageError
from configs.schema import read_config
from data.sources import source_reads
from helpers import make_image_folder, run_in_process
from trainer.files.run_lock import LOCK_NAME, MARKER_NAME, RunLock, check_run_folder, is_run_folder, mark_run_folder

MAIN = SimpleNamespace(is_main_process=True, num_processes=1)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _make(folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith("/"):
            (folder / name).mkdir(parents=True)
        else:
            (folder / name).write_text(f"the user's {name}")
    return folder


@pytest.mark.parametrize("names", [
    (),  # empty
    (LOCK_NAME,),  # a run killed before writing anything
    (MARKER_NAME, "notes.txt"),  # a run folder, whatever else is in it
    ("config.toml", "checkpoints/"),  # made by an older version
    ("config.toml", "metrics.jsonl", "best.safetensors"),
], ids=["empty", "lock-only", "marker", "old-checkpoints", "old-metrics"])
def test_new_empty_and_run_folders_are_taken(tmp_path, names):
    run_dir = _make(tmp_path / "run", names)
    check_run_folder(run_dir)
    check_run_folder(tmp_path / "new" / "run")
    with RunLock(run_dir, MAIN) as lock:
        assert lock.held


@pytest.mark.parametrize("names, shown", [
    (("config.toml", "best.safetensors"), "best.safetensors, config.toml"),  # the reviewer's case: run.dir=.
    (("config.toml",), "config.toml"),  # no checkpoints/, no metrics.jsonl: not a run's shape
    (("a.py", "b/", "c.txt", "d.md", ".git/"), ".git, a.py, b and 2 more"),
], ids=["configs-and-weights", "config-alone", "project"])
def test_a_users_folder_is_refused_and_left_as_it_was(tmp_path, names, shown):
    run_dir = _make(tmp_path / "mine", names)
    before = _snapshot(run_dir)
    with pytest.raises(UsageError, match=rf"run.dir={run_dir} holds files that are not a run's \({shown}\): a run "
                                         rf"writes only into a new folder, an empty one or a run folder"):
        with RunLock(run_dir, MAIN):
            pass
    assert _snapshot(run_dir) == before  # no lock, no marker


def test_root_and_home_are_refused(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="run.dir=/ is the root folder"):
        check_run_folder(Path("/"))
    home = _make(tmp_path / "home", ())
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(UsageError, match=rf"run.dir={home} is your home folder"):
        check_run_folder(home)  # even empty
    check_run_folder(home / "runs" / "first")


def test_the_data_folder_and_the_csvs_folder_are_refused(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=1)
    labels = tmp_path / "meta" / "labels.csv"
    labels.parent.mkdir()
    labels.write_text("file,label\n")
    d = SimpleNamespace(root=str(images), source="csv", csv=str(labels))
    reads = source_reads(d)
    assert reads == [images.resolve(), labels.resolve()]
    for run_dir, why in [(images, "is the data folder"), (images / "runs" / "a", "is inside the data folder"),
                         (images / "red", "is inside the data folder"),
                         (labels.parent, "is the folder of labels.csv, which the run reads")]:
        with pytest.raises(UsageError, match=why):
            check_run_folder(run_dir.resolve(), reads)
    check_run_folder((labels.parent / "runs" / "a").resolve(), reads)  # beside the CSV, in a folder of its own
    relative = SimpleNamespace(root=str(images), source="csv", csv="labels.csv")  # data.csv is in data.root
    assert source_reads(relative)[1] == images.resolve() / "labels.csv"
    for kind in ("folder", "hf", "shards"):
        assert source_reads(SimpleNamespace(root=str(images), source=kind, csv="")) == [images.resolve()]


@pytest.mark.parametrize("value, message", [
    ("", "run.dir is empty (an unset shell variable?)"),
    ("  ", "run.dir is empty"),
    ("/", "run.dir=/ is the root folder"),
    ("//", "run.dir=// is the root folder"),
])
def test_the_schema_refuses_an_empty_or_root_run_dir(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_config(None, ["data.root=/data", "model.name=tiny_cnn", f"run.dir={value}"])
    read_config(None, ["data.root=/data", "model.name=tiny_cnn", "run.dir=."])  # "." is checked on disk


def test_the_marker_makes_a_run_folder(tmp_path):
    assert not is_run_folder(tmp_path)
    mark_run_folder(tmp_path)
    marker = json.loads((tmp_path / MARKER_NAME).read_text())
    assert marker["project"] == "imgtrain" and marker["version"] and marker["created"]
    assert is_run_folder(tmp_path)


def test_a_run_in_the_users_current_folder_is_refused_with_nothing_written(tmp_path):
    """The reviewer's case end to end: run.dir=. where the user keeps a config.toml and weights."""
    images = make_image_folder(tmp_path / "images", per_class=2)
    work = _make(tmp_path / "work", ("config.toml", "best.safetensors"))
    before = _snapshot(work)
    result = run_in_process("train.py", f"data.root={images}", "run.dir=.", "model.name=tiny_cnn",
                            "data.image_size=16", "runtime.device=cpu", "data.audit=off", cwd=work)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds files that are not a run's (best.safetensors, config.toml)" in errors[0]
    assert "Traceback" not in result.stderr
    assert _snapshot(work) == before
