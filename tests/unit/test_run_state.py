"""Run state split by job: the samplers' declared resume interface, log trimming by each log's
writer (a damaged line included), and stop signals."""

import json
import os
import signal

import pytest

from data.files import trim_jsonl
from data.sampling import ResumableOrder, ResumableSampler
from data.shards import ShardOrder
from trainer.fit.signals import StopSignals


@pytest.mark.parametrize("order", [ResumableSampler(10, 4, seed=0), ShardOrder([6, 4], 4, 0, 0, 1, 2, 8)])
def test_both_training_orders_declare_the_resume_interface(order):
    assert isinstance(order, ResumableOrder)
    order.start_epoch(2, 4)
    assert (order.epoch, order.samples_done) == (2, 4)
    assert order.padded_size == 10 and order.steps_per_epoch == 3 and order.samples_per_step == 4


def test_trim_keeps_what_was_trained_and_drops_a_cut_line(tmp_path):
    log = tmp_path / "train_steps.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    log.write_text("\n".join(lines) + "\n" + '{"step": 5, "lo')  # a full disk cut the last append
    assert trim_jsonl(log, "step", 3) == 1
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert trim_jsonl(log, "step", 3) == 0  # nothing left to repair
    assert trim_jsonl(tmp_path / "missing.jsonl", "step", 3) == 0


def test_trim_counts_a_record_without_its_key_as_damaged(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1}\n[1, 2]\n{"other": 3}\n\n{"epoch": 2}\n')
    assert trim_jsonl(log, "epoch", 5) == 2
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


class _OneProcess:
    num_processes = 1


def test_a_signal_is_a_stop_request_and_a_second_ctrl_c_stops_at_once():
    signals = StopSignals(_OneProcess())
    signals.install()
    try:
        assert not signals.agreed(1, last_of_epoch=False)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.agreed(2, last_of_epoch=False) and signals.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signals.close()
    assert signal.getsignal(signal.SIGTERM) is not signals._on_signal
