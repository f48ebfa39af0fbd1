"""Tar shards: the writer and index, the epoch's order (split by process and worker, equal steps,
the shuffle buffer), starting mid-epoch without decoding what is skipped, and damaged input."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from configs.errors import UsageError
from data.folders import discover
from data.dataset import ImageListDataset
from data.shards import (ShardMembers, ShardOrder, ShardStream, buffer_order, parse_size, read_index, verify_shards,
                         write_shards)
from data.sampling import seeded_call
from data.transforms import Preprocessing, train_transform
from helpers import make_image_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """39 training samples (30 of them 16x16 PNGs of ~0.8 KB) in shards of ~4 KB, 6 validation."""
    root = tmp_path_factory.mktemp("shards")
    splits = discover(make_image_folder(root / "images", per_class=15), 0.15, 0)
    write_shards(splits, root / "shards", 4000, ([0.5] * 3, [0.25] * 3), {"source": "folder"}, say=lambda _: None)
    return root / "shards", splits


class Fingerprint:
    """A 'decoder' that returns which sample it got (a hash of its bytes) and a draw from torch's
    RNG (which must be seeded per sample for augmentation to replay)."""

    calls = 0

    def load(self, fileobj, max_pixels):
        Fingerprint.calls += 1
        digest = int(hashlib.sha256(fileobj.read()).hexdigest()[:12], 16)
        return torch.tensor([digest, int(torch.randint(2**40, ()))])


def epoch_batches(root, *, rank=0, world=1, workers=0, epoch=1, samples_done=0, batch=4, buffer=8):
    index = read_index(root)
    order = ShardOrder([s["samples"] for s in index.shards("train")], batch, 7, rank, world, workers, buffer)
    order.start_epoch(epoch, samples_done)
    images = ImageListDataset(index.samples("train"), ShardMembers(index, Fingerprint()), None, 0)
    stream = ShardStream(index, order, images, default_collate)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda b: b)
    assert len(loader) == order.steps_per_epoch - samples_done // (batch * world)
    return [(images.tolist(), labels.tolist()) for images, labels, _ in loader]


def test_index_records_every_shard_and_the_source(shards):
    root, splits = shards
    raw = json.loads((root / "index.json").read_text())
    assert raw["classes"] == splits.classes and raw["mean"] == [0.5] * 3
    train = raw["splits"]["train"]
    assert train["samples"] == len(splits.train) == 39 and len(train["shards"]) > 4
    assert [s["file"] for s in train["shards"]][:2] == ["train-000000.tar", "train-000001.tar"]
    assert len(raw["source"]["samples_sha256"]) == 64
    # The members are the files' own bytes and their class index, in WebDataset's naming.
    # (training samples in an order shuffled by the seed: the shuffle buffer only mixes neighbours)
    written = [splits.train[i] for i in np.random.default_rng(0).permutation(39)]
    with tarfile.open(root / "train-000000.tar") as tar:
        names = tar.getnames()[:2]
        assert names == ["00000000.png", "00000000.cls"]
        assert tar.extractfile(names[0]).read() == open(written[0][0], "rb").read()
        assert int(tar.extractfile(names[1]).read()) == written[0][1]
    index = read_index(root)
    assert [label for _, label in index.samples("train")] == [label for _, label in written]
    assert [label for _, label in index.samples("val")] == [label for _, label in splits.val]


def test_processes_and_workers_split_the_epoch_into_equal_steps(shards):
    root, splits = shards
    everything = collections.Counter(int(hashlib.sha256(open(p, "rb").read()).hexdigest()[:12], 16)
                                     for p, _ in splits.train)
    # 39 samples, 2 processes: padded to 40 (one repeat), 20 each, 5 batches of 4 on both.
    ranks = [epoch_batches(root, rank=r, world=2, workers=2) for r in range(2)]
    assert [len(b) for b in ranks] == [5, 5]
    seen = collections.Counter(sample[0] for batches in ranks for images, _ in batches for sample in images)
    assert sum(seen.values()) == 40 and set(seen) == set(everything) and max(seen.values()) == 2
    # The order is a function of (seed, epoch, processes, workers) alone; epochs differ.
    assert ranks[0] == epoch_batches(root, rank=0, world=2, workers=2)
    assert ranks[0] != epoch_batches(root, rank=0, world=2, workers=2, epoch=2)
    one = epoch_batches(root, workers=1)
    assert len(one) == 10 and [len(images) for images, _ in one][-1] == 3  # 39 = 9 x 4 + 3


@pytest.mark.parametrize("world, workers", [(1, 2), (2, 1), (1, 0)])
def test_starting_mid_epoch_gives_the_rest_of_the_same_epoch_without_decoding_the_rest(shards, world, workers):
    root, _ = shards
    for rank in range(world):
        full = epoch_batches(root, rank=rank, world=world, workers=workers, epoch=3)
        for k in (1, 3, len(full) - 1):
            Fingerprint.calls = 0
            rest = epoch_batches(root, rank=rank, world=world, workers=workers, epoch=3, samples_done=k * 4 * world)
            assert rest == full[k:], (rank, k)
            if workers == 0:  # decoded in this process: nothing skipped was decoded
                assert Fingerprint.calls == sum(len(images) for images, _ in full[k:])


def test_shuffle_buffer_order_is_a_bounded_permutation():
    out = buffer_order(1000, 50, seed=1)
    assert sorted(out.tolist()) == list(range(1000)) and out.tolist() != list(range(1000))
    assert all(out[t] < t + 50 for t in range(1000))  # a reader never holds more than the buffer
    assert np.array_equal(out, buffer_order(1000, 50, seed=1)) and not np.array_equal(out, buffer_order(1000, 50, 2))
    assert buffer_order(10, 1, seed=1).tolist() == list(range(10))


def test_decoding_shard_bytes_is_decoding_the_file(shards):
    root, splits = shards
    transform, _ = train_transform("standard", 16)
    path = splits.train[0][0]
    from_file = seeded_call(5, transform.load, path, 0)
    assert torch.equal(from_file, seeded_call(5, transform.load, io.BytesIO(open(path, "rb").read()), 0))


def copy_shards(root, tmp_path):
    import shutil

    return shutil.copytree(root, tmp_path / "copy")


def test_damaged_missing_or_empty_input_is_one_line_naming_the_file(shards, tmp_path):
    root, splits = shards
    copy = copy_shards(root, tmp_path)
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"train-000001.tar is damaged: its sha256 differs"):
        verify_shards(read_index(copy))
    shard.write_bytes(bytes(data[:1000]))  # truncated
    with pytest.raises(UsageError, match=r"train-000001.tar is damaged: 1000 bytes, index.json says"):
        read_index(copy)
    shard.unlink()
    with pytest.raises(UsageError, match=r"train-000001.tar is missing"):
        read_index(copy)
    (copy / "index.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"index.json is not a readable shards index"):
        read_index(copy)
    (copy / "index.json").unlink()
    with pytest.raises(UsageError, match=r"index.json not found: data.source = shards reads a folder written by"):
        read_index(copy)
    raw = json.loads((root / "index.json").read_text())
    raw["splits"]["val"].update(samples=0, shards=[])
    shard.write_bytes((root / shard.name).read_bytes())
    (copy / "index.json").write_text(json.dumps(raw))
    with pytest.raises(UsageError, match=r"the val split has no samples"):
        read_index(copy)


def test_a_verified_shard_is_not_hashed_again_until_it_changes(shards, tmp_path):
    root, _ = shards
    copy = copy_shards(root, tmp_path)
    index = read_index(copy)
    count = len(index.shards("train")) + len(index.shards("val"))
    assert verify_shards(index) == count  # first start: every shard read
    assert verify_shards(index) == 0  # unchanged: none
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes, a new mtime: read again and refused
    shard.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"train-000001.tar is damaged: its sha256 differs"):
        verify_shards(index)
    shard.write_bytes((root / shard.name).read_bytes())  # repaired: the one file is read again
    assert verify_shards(index) == 1 and verify_shards(index) == 0


def test_writer_refuses_a_used_folder_and_an_empty_split(shards, tmp_path):
    _, splits = shards
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(UsageError, match="already exists and is not empty"):
        write_shards(splits, tmp_path / "used", 4000, (), {})
    empty = type(splits)(splits.root, splits.classes, splits.train, [])
    with pytest.raises(UsageError, match="the val split .* is empty"):
        write_shards(empty, tmp_path / "new", 4000, (), {})
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))


@pytest.mark.parametrize("text, size", [("256MB", 256_000_000), ("64MiB", 64 * 2**20), ("1.5GB", 1_500_000_000),
                                        ("4000", 4000), ("2kb", 2000)])
def test_shard_size_parses_units(text, size):
    assert parse_size(text) == size


def test_shard_size_refuses_nonsense():
    with pytest.raises(UsageError, match="give bytes with a unit"):
        parse_size("big")


def test_validation_samples_read_from_the_tars_are_the_files(shards):
    root, splits = shards
    index = read_index(root)
    eval_tf = Preprocessing(16, 0.875, (0.5,) * 3, (0.25,) * 3, "center").eval_transform()
    from_tars = ImageListDataset(index.samples("val"), ShardMembers(index, eval_tf))
    from_files = ImageListDataset(splits.val, eval_tf)
    assert len(from_tars) == len(from_files) == 6
    for i in range(len(from_files)):
        assert torch.equal(from_tars[i][0], from_files[i][0]) and from_tars[i][1] == from_files[i][1]


def test_with_one_shard_each_process_still_gets_other_samples_every_epoch(shards, tmp_path):
    _, splits = shards
    write_shards(splits, tmp_path / "one", 10**9, (), {}, say=lambda _: None)
    assert len(read_index(tmp_path / "one").shards("train")) == 1
    rank0 = [{sample[0] for images, _ in epoch_batches(tmp_path / "one", world=2, epoch=e) for sample in images}
             for e in (1, 2)]
    assert len(rank0[0]) == len(rank0[1]) == 20 and rank0[0] != rank0[1]
