"""The command line of the run-building scripts: overrides anywhere, and every bad command line one
`error:` line with exit code 2 that says what was meant (table-driven, in this interpreter)."""

import pytest

from helpers import REPO, run_in_process

DEMO = str(REPO / "configs" / "demo.toml")


@pytest.mark.parametrize("args, present", [
    (["--config", DEMO, "data.root=/x", "--print-config", "train.epochs=1"], ['root = "/x"', "epochs = 1"]),
    (["--print-config", "--config", DEMO, "--device", "cpu", "data.batch_size=8"],
     ['device = "cpu"', "batch_size = 8"]),
    (["data.root=/x", "model.name=tiny_cnn", "--print-config", "train.epochs=2", "train.epochs=3"], ["epochs = 3"]),
])
def test_overrides_may_come_before_and_after_options(tmp_path, args, present):
    result = run_in_process("train.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for text in present:
        assert text in result.stdout.splitlines(), text


@pytest.mark.parametrize("args, line", [
    (["--epochs", "3"], "unknown option --epochs: config keys are set as section.key=value, e.g. train.epochs=3"),
    (["--lr=0.1"], "unknown option --lr: config keys are set as section.key=value, e.g. optim.lr=0.1"),
    (["--batch-size", "8"], "e.g. data.batch_size=8"),
    (["--seed", "1"], "e.g. data.seed=1 or train.seed=1"),
    (["--confg", DEMO], "unknown option --confg; did you mean --config?"),
    (["--foo"], "unknown option --foo (options: --help, --config, --device, --print-config, --keys); config keys"),
    (["--device", "gpu"], "argument --device: invalid choice: 'gpu' (choose from 'auto', 'cpu', 'cuda') "
                          "(see train.py --help)"),
    (["--config", "data.batch_size=8"], "--config takes a TOML file, not the override 'data.batch_size=8': "
                                        "--config FILE data.batch_size=8"),
    (["--config"], "argument --config: expected one argument (see train.py --help)"),
    (["--config", str(REPO / "configs")], f"--config {REPO / 'configs'} is a folder; give a TOML file"),
])
def test_a_bad_command_line_is_one_line_saying_what_was_meant(tmp_path, args, line):
    result = run_in_process("train.py", "data.root=/x", "model.name=tiny_cnn", "--print-config", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and line in result.stderr, result.stderr


def test_a_binary_file_as_config_is_one_line(tmp_path):
    config = tmp_path / "model.safetensors"
    config.write_bytes(b"\x80\x02\xff\xfe" * 8)
    result = run_in_process("train.py", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: {config} is not a text file; --config takes a TOML file, e.g. configs/demo.toml\n"
