"""Shards folders that were not written as make_shards writes them: member names and index paths
outside the folder, labels that are not whole numbers, an index of another shape; make_shards on
a full disk, and the leftovers of a killed make_shards."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from configs.errors import UsageError
from data.files import WriteFailed
from data.folders import discover
from data.shards import read_index, verify_shards, write_shards
from helpers import make_image_folder


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    splits = discover(make_image_folder(root / "images", per_class=4), 0.25, 0)
    write_shards(splits, root / "shards", 1 << 20, ([0.5] * 3, [0.25] * 3), {"source": "folder"}, say=lambda _: None)
    return root / "shards", splits


@pytest.fixture
def shards(written, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(written[0], copy)
    return copy


def edit_index(folder, edit) -> None:
    raw = json.loads((folder / "index.json").read_text())
    raw = edit(raw) or raw
    (folder / "index.json").write_text(json.dumps(raw))


def one_line_refusal(call) -> str:
    with pytest.raises(UsageError) as e:
        call()
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    return str(e.value)


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/outside.tar", "sub/train-000000.tar", ".."])
def test_an_index_entry_outside_the_folder_is_refused_unopened(shards, name):
    outside = shards.parent / "outside.tar"
    outside.write_bytes(b"secret")  # what a ../ entry would otherwise have had opened and hashed
    edit_index(shards, lambda raw: raw["splits"]["train"]["shards"][0].update(file=name))
    message = one_line_refusal(lambda: read_index(shards))
    assert "not the name of a .tar in the shards folder" in message and "launch/make_shards.py" in message


def test_a_float_label_and_an_index_that_is_a_list_are_refused(shards):
    edit_index(shards, lambda raw: raw["splits"]["train"]["shards"][0]["labels"].__setitem__(0, 1.0))
    assert "labels holds 1.0, not a whole number" in one_line_refusal(lambda: read_index(shards))
    (shards / "index.json").write_text(json.dumps([{"format": "imgtrain-shards"}]))
    assert "holds a JSON list, not an object" in one_line_refusal(lambda: read_index(shards))
    (shards / "index.json").write_text(json.dumps({"format": "imgtrain-shards", "version": 1, "classes": ["a"],
                                                   "mean": [], "std": [], "splits": {"train": [], "val": []}}))
    assert "splits.train is not an object" in one_line_refusal(lambda: read_index(shards))


@pytest.mark.parametrize("member", ["../x", "/abs", "a/00000000.png"])
def test_a_tar_member_named_outside_the_folder_is_refused(shards, member):
    """The tar rewritten with one member renamed, and index.json's sha256 made to match: only the
    names give it away. Refused where the shards are checked, before any reader sees the tar."""
    entry = json.loads((shards / "index.json").read_text())["splits"]["train"]["shards"][0]
    path = shards / entry["file"]
    rewritten = io.BytesIO()
    with tarfile.open(path) as old, tarfile.open(fileobj=rewritten, mode="w", format=tarfile.USTAR_FORMAT) as new:
        for i, info in enumerate(old.getmembers()):
            data = old.extractfile(info).read()
            if i == 2:
                info.name = member
            new.addfile(info, io.BytesIO(data))
    path.write_bytes(rewritten.getvalue())
    digest = hashlib.sha256(rewritten.getvalue()).hexdigest()
    edit_index(shards, lambda raw: raw["splits"]["train"]["shards"][0].update(sha256=digest,
                                                                             bytes=len(rewritten.getvalue())))
    index = read_index(shards)
    message = one_line_refusal(lambda: verify_shards(index, audit_dir=str(shards.parent / "audit")))
    assert f"member {member!r} is not a sample file KEY.ext" in message and "rewrite the shards" in message


def test_make_shards_on_a_full_disk_is_one_line_and_leaves_nothing(written, tmp_path, monkeypatch):
    import data.shards as shards_module

    _, splits = written
    real, calls = shards_module._ShardWriter._member, []

    def fills_up(self, name, data):
        calls.append(name)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, name, data)

    monkeypatch.setattr(shards_module._ShardWriter, "_member", fills_up)
    out = tmp_path / "out"
    with pytest.raises(WriteFailed) as e:
        write_shards(splits, out, 1 << 20, (), {}, say=lambda _: None)
    assert e.value.exit_code == 1 and str(e.value).startswith(f"could not write {out}: the disk is full; ")
    assert list(tmp_path.iterdir()) == []  # no shards folder, no hidden temporary one


def test_leftovers_of_a_killed_make_shards_are_removed_by_the_next(written, tmp_path):
    """A killed make_shards leaves `.OUT.tmp-PID` (partial shards); the next one writing OUT removes
    those whose process is gone, and only those: a live writer's, and other names, stay."""
    _, splits = written
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: no process has this pid now
    dead, live = tmp_path / f".out.tmp-{child.pid}", tmp_path / f".out.tmp-{os.getppid()}"
    others = [tmp_path / f".other.tmp-{child.pid}", tmp_path / ".out.tmp-x1", tmp_path / "out.tmp-1"]
    for folder in (dead, live, *others):
        folder.mkdir()
        (folder / "train-000000.tar").write_bytes(b"partial")
    write_shards(splits, tmp_path / "out", 1 << 20, (), {}, say=lambda _: None)
    assert not dead.exists() and live.exists() and all(p.exists() for p in others)
    assert (tmp_path / "out" / "index.json").is_file()
