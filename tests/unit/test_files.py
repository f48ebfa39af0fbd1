"""data/files.py: a failed write leaves the old file and no temporary behind; digests match hashlib."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from data import files
from data.files import atomic_output, atomic_write_json, atomic_write_text, sha256_file


def _only(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_replaces_and_creates_the_folder(tmp_path):
    path = tmp_path / "new" / "a.json"
    atomic_write_json(path, {"b": 1.1, "a": [1, 2]}, sort_keys=True)
    assert path.read_text() == '{"a": [1, 2], "b": 1.1}'
    atomic_write_text(path, "second")
    assert path.read_text() == "second" and _only(path.parent) == ["a.json"]


def test_failure_mid_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "plot.png"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(path) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".png"  # same file system; format kept
            tmp.write_text("half a fi")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and _only(tmp_path) == ["plot.png"]


def test_unserializable_json_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"step": object()}, durable=True)
    assert json.loads(path.read_text()) == {"step": 1} and _only(tmp_path) == ["state.json"]


def test_durable_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(files, "fsync_file", lambda p: calls.append(("file", os.path.exists(tmp_path / "x.bin"))))
    monkeypatch.setattr(files, "fsync_dir", lambda p: calls.append(("dir", os.path.exists(tmp_path / "x.bin"))))
    with atomic_output(tmp_path / "x.bin", durable=True) as tmp:
        tmp.write_bytes(b"\0" * 10)
    assert calls == [("file", False), ("dir", True)]
    calls.clear()
    atomic_write_text(tmp_path / "y.txt", "cheap")
    assert calls == []


def test_sha256_file_equals_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # several read blocks and a partial one
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
