"""Resume pieces, in-process: sampler, seeded samples, optimizer state, rotation, damaged checkpoints,
config changes. The kill-and-resume runs are in tests/e2e/test_resume_killed.py."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from data.sampling import ResumableSampler, SeededSamples
from models.build import build_classifier, read_state_dict
from configs.schema import Config
from configs.errors import UsageError
from trainer.fit.restore import config_changes, find_checkpoint
from trainer.files.checkpoints import (COMPLETE, flatten_optimizer, mark_best, newest_valid, rotate, save_checkpoint,
                                  unflatten_optimizer)


# ----------------------------------------------------------------------------------------------
# The pieces, in-process


def test_sampler_resumes_at_any_batch_and_shards_disjointly():
    full = ResumableSampler(27, batch_size=4, seed=3)
    full.start_epoch(2)
    order = list(full)
    assert sorted(i for i, _ in order) == list(range(27))
    later = ResumableSampler(27, batch_size=4, seed=3)
    later.start_epoch(2, samples_done=12)
    assert list(later) == order[12:]  # same indices and same augmentation seeds
    other_epoch = ResumableSampler(27, batch_size=4, seed=3)
    other_epoch.start_epoch(3)
    assert [i for i, _ in other_epoch] != [i for i, _ in order]

    shards = [ResumableSampler(27, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.start_epoch(2)
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b) == 14 and shards[0].steps_per_epoch == 4
    assert {i for i, _ in a + b} == set(range(27))  # padded by one repeat, nothing lost
    # Resuming two processes' position with three: the same samples seen, the rest split three ways.
    done = 2 * shards[0].samples_per_step
    thirds = [ResumableSampler(27, batch_size=4, seed=3, rank=r, world_size=3) for r in range(3)]
    for s in thirds:
        s.start_epoch(2, samples_done=done)
    rest = {i for s in thirds for i, _ in s}
    seen = {i for i, _ in a[:8] + b[:8]}
    assert rest | seen == set(range(27)) and not rest & seen


def test_seeded_samples_replay_augmentation_and_leave_the_global_rng_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3), random.random(), np.random.rand()

    ds = SeededSamples(Noisy())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    seed, first = ds[(1, 1234)]
    assert seed == 1234 and torch.equal(torch.get_rng_state(), before)
    _, again = ds[(1, 1234)]
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    assert not torch.equal(first[0], ds[(1, 1235)][1][0])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_state_survives_safetensors_and_json(name, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if name == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.1))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    tensors, meta = flatten_optimizer(opt.state_dict())
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read from the file: not the live buffers
    meta = json.loads(json.dumps(meta))
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    twin_opt = type(opt)(twin.parameters(), lr=1.0)
    twin_opt.load_state_dict(unflatten_optimizer(tensors, meta))
    assert twin_opt.param_groups[0]["lr"] == 0.1
    batch = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(batch).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def _trainer_state(step: int) -> dict:
    """The keys resuming reads (state_folder.verify checks each and its type)."""
    return {"global_step": step, "epoch": 1, "epoch_complete": False, "samples_done": step, "history": [],
            "epochs_without_improvement": 0, "scheduler": {}, "class_names": ["a", "b"], "config": {}}


def _write_checkpoints(root: Path, steps) -> None:
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in steps:
        save_checkpoint(accelerator, root, step, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                        trainer_state=_trainer_state(step), rank_tensors={"torch_cpu": torch.get_rng_state()},
                        rank_json={})


def test_rotation_keeps_exactly_keep_last_plus_best(tmp_path):
    root = tmp_path / "checkpoints"
    _write_checkpoints(root, [1, 2])
    mark_best(root, root / "step-00000002")
    _write_checkpoints(root, [3, 4, 5, 6])
    (root / "step-00000007").mkdir()  # a folder a kill left incomplete, newer than all: kept for now
    rotate(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "step-00000002", "step-00000005", "step-00000006", "step-00000007"]
    assert (root / "latest").read_text().strip() == "step-00000006"


def test_truncated_or_damaged_checkpoint_is_named_and_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    _write_checkpoints(root, [3, 6, 9])
    opt_file = root / "step-00000009" / "optimizer.safetensors"
    opt_file.write_bytes(opt_file.read_bytes()[:-7])
    model_file = root / "step-00000006" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    skipped = []
    folder, state = newest_valid(root, skipped.append)
    assert folder.name == "step-00000003" and state["global_step"] == 3
    assert skipped == [f"skipping checkpoint step-00000009: {opt_file} is truncated or damaged: "
                       f"{opt_file.stat().st_size} bytes, {opt_file.stat().st_size + 7} expected",
                       f"skipping checkpoint step-00000006: {model_file} is damaged: its sha256 does not "
                       f"match {COMPLETE}"]
    with pytest.raises(UsageError, match="optimizer.safetensors is truncated"):
        find_checkpoint(str(root / "step-00000009"), root, print)
    with pytest.raises(UsageError, match="already holds checkpoints: set run.resume=auto"):
        find_checkpoint("", root, print)


@pytest.mark.parametrize("override, outcome", [
    ("train.epochs=9", "ok"),
    ("train.log_every_steps=1", "ok"),
    ("wandb.mode=offline", "ok"),
    ("optim.lr=0.5", "warning: optim.lr 0.001 -> 0.5"),
    ("model.name=timm/test_vit", "cannot resume: model.name is 'timm/test_vit' but the checkpoint was trained "
                                 "with 'tiny_cnn'; set model.name='tiny_cnn' or start a new run.dir"),
    ("model.head=mlp", "cannot resume: model.head is 'mlp'"),
    ("optim.name=sgd", "cannot resume: optim.name is 'sgd'"),
    ("data.val_fraction=0.5", "cannot resume: data.val_fraction is 0.5"),
])
def test_config_changes_on_resume(override, outcome):
    saved = Config()
    saved.model.name = "tiny_cnn"
    cfg = Config()
    cfg.model.name = "tiny_cnn"
    section, rest = override.split(".", 1)
    key, value = rest.split("=")
    current = getattr(getattr(cfg, section), key)
    setattr(getattr(cfg, section), key, type(current)(value))
    if outcome.startswith("cannot"):
        with pytest.raises(UsageError) as e:
            config_changes(saved.to_dict(), cfg, ["a", "b"], ["a", "b"])
        assert str(e.value).startswith(outcome)
    else:
        warnings = config_changes(saved.to_dict(), cfg, ["a", "b"], ["a", "b"])
        assert warnings == ([] if outcome == "ok" else [warnings[0]])
        if outcome != "ok":
            assert outcome.removeprefix("warning: ") in warnings[0]


def test_changed_classes_are_refused_by_name():
    with pytest.raises(UsageError, match=r"classes differ from the checkpoint's \(added \['c'\], missing \['b'\]\)"):
        config_changes(Config().to_dict(), Config(), ["a", "b"], ["a", "c"])


def test_malicious_pickle_given_as_weights_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": Payload()}, evil)
    assert b"system" in evil.read_bytes()  # the payload really is in the file
    with pytest.raises(UsageError, match="refusing .*evil.pth: it needs arbitrary objects unpickled"):
        read_state_dict(evil)
    with pytest.raises(UsageError, match="refusing"):
        build_classifier("tiny_cnn", 3, weights=str(evil))
    assert not marker.exists()


def test_a_hand_edit_of_state_json_is_named_with_its_key(tmp_path):
    root = tmp_path / "checkpoints"
    _write_checkpoints(root, [3])
    folder = root / "step-00000003"
    for edit, message in [(lambda s: s.pop("global_step"), "has no 'global_step'"),
                          (lambda s: s.update(epoch="1"), "'epoch' must be int, not str")]:
        state = json.loads((folder / "state.json").read_text())
        edit(state)
        (folder / "state.json").write_text(json.dumps(state))
        manifest = json.loads((folder / COMPLETE).read_text())  # consistent: the checksum follows the edit
        data = (folder / "state.json").read_bytes()
        manifest["files"]["state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (folder / COMPLETE).write_text(json.dumps(manifest))
        with pytest.raises(UsageError, match=message):
            find_checkpoint(str(folder), root, print)
        _write_checkpoints(root, [3])  # whole again for the next edit


def test_auto_resume_refuses_when_every_checkpoint_is_damaged(tmp_path):
    root = tmp_path / "checkpoints"
    _write_checkpoints(root, [3, 6])
    for folder in root.glob("step-*"):
        (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match=r"every checkpoint in .* is damaged \(step-00000006, step-00000003"):
        find_checkpoint("auto", root, print)
