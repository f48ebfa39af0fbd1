"""Every launch script: one parser (launch/cli.py), so a bad flag is one `error:` line, exit 2 and
nothing written; --help and bad input answered before torch is imported; output names without an
extension get the script's own, other ones are refused before any work (table-driven)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import PYTHON, REPO, make_image_folder, run_env, run_in_process

from configs.errors import UsageError

sys.path.insert(0, str(REPO / "launch"))  # launch/ is not a package; only while cli is imported
try:
    from cli import output_file, output_folder
finally:
    sys.path.remove(str(REPO / "launch"))

DEMO = str(REPO / "configs" / "demo.toml")
MISSING = "/nonexistent/imgtrain"
# Each script's required arguments, so that what is tested is the flag, not a missing argument.
REQUIRED = {
    "audit.py": [MISSING],
    "evaluate.py": ["--checkpoint", "missing.safetensors", "--split", "val"],
    "export.py": ["--checkpoint", "missing.safetensors", "--out", "export"],
    "list_models.py": [],
    "lr_find.py": [],
    "make_shards.py": ["--out", "shards"],
    "overfit_check.py": [],
    "predict.py": ["--checkpoint", "missing.safetensors", "a.jpg"],
    "prepare_demo.py": [],
    "search.py": ["--space", "space.toml", "--trials", "2", "--out", "study"],
    "show_batch.py": [],
    "train.py": [],
}
RUN_BUILDING = ("lr_find.py", "make_shards.py", "overfit_check.py", "search.py", "show_batch.py", "train.py")
HEAVY = ("torch", "torchvision", "timm", "wandb", "matplotlib")


def test_the_table_names_every_launch_script():
    scripts = {p.name for p in (REPO / "launch").glob("*.py")} - {"cli.py", "_paths.py"}
    assert scripts == set(REQUIRED)


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_a_bad_flag_is_one_error_line_and_exit_2(tmp_path, script):
    result = run_in_process(script, *REQUIRED[script], "--no-such-flag", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: unknown option --no-such-flag"), result.stderr
    assert f"{script} --help" in result.stderr or "--keys" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script, args, line", [
    ("predict.py", ["--chekpoint", "x.safetensors", "a.jpg"], "unknown option --chekpoint; did you mean --checkpoint?"),
    ("evaluate.py", ["--checkpoint", "x.safetensors", "a", "b"], "unexpected argument 'b' (see evaluate.py --help)"),
    ("audit.py", [], "the following arguments are required: root (see audit.py --help)"),
    ("predict.py", ["--checkpoint", "x", "--kaggle-label", "id"], "argument --kaggle-label: invalid choice: 'id'"),
])
def test_what_a_bad_command_line_meant(tmp_path, script, args, line):
    result = run_in_process(script, *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {line}"), result.stderr


# ----------------------------------------------------------------------------------------------
# Parse first, import torch only when needed

# Runs one script's command lines in turn in one interpreter, as `python launch/x.py ...` runs
# them, and after each says which heavy libraries are loaded: the first line that loads one is named.
PROBE = """
import contextlib, io, json, os, runpy, sys
script, lines, heavy = sys.argv[1], json.loads(sys.argv[2]), set(json.loads(sys.argv[3]))
sys.path.insert(0, os.path.dirname(script))
report = []
for args in lines:
    sys.argv = [script, *args]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
    loaded = sorted({m.split(".")[0] for m in sys.modules} & heavy)
    report.append({"args": args, "code": code, "stderr": err.getvalue(), "loaded": loaded})
print(json.dumps(report))
"""


def light_lines(script: str) -> list[tuple[list[str], int]]:
    """(command line, exit code) of everything that must answer without torch."""
    lines = [(["--help"], 0), ([*REQUIRED[script], "--no-such-flag"], 2)]
    if script in RUN_BUILDING:
        lines.append(([*REQUIRED[script], "no_such.key=1"], 2))
        lines.append(([*REQUIRED[script], "--config", DEMO, "data.image_size=many"], 2))
    if script in ("lr_find.py", "overfit_check.py", "show_batch.py", "train.py"):  # they read the training data
        lines.append(([*REQUIRED[script], "data.root=no/such/folder"], 2))
    if script == "train.py":
        lines += [(["--keys"], 0), (["--config", DEMO, "--print-config"], 0)]
    return lines


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_help_and_bad_input_import_no_torch(tmp_path, script):
    lines = light_lines(script)
    result = subprocess.run([PYTHON, "-c", PROBE, str(REPO / "launch" / script), json.dumps([a for a, _ in lines]),
                             json.dumps(HEAVY)], cwd=tmp_path, env=run_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for (args, code), seen in zip(lines, json.loads(result.stdout.splitlines()[-1])):
        assert seen["code"] == code, (args, seen["stderr"])
        assert seen["loaded"] == [], f"{script} {' '.join(args)} imported {seen['loaded']}"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Output names


@pytest.mark.parametrize("named, kinds, path, note", [
    ("lr", (".png", ".svg"), "lr.png", "note: --out lr has no extension: wrote lr.png"),
    ("plots/lr", (".png",), "plots/lr.png", "note: --out plots/lr has no extension: wrote plots/lr.png"),
    ("lr.svg", (".png", ".svg"), "lr.svg", ""),
    ("LR.PNG", (".png",), "LR.PNG", ""),
])
def test_an_output_file_gets_its_extension(named, kinds, path, note):
    assert output_file(named, "--out", kinds) == (path, note)


@pytest.mark.parametrize("named, kinds, message", [
    ("lr.txt", (".png", ".svg"), "--out lr.txt: name a .png or .svg file"),
    ("preds.v2", (".csv",), "--out preds.v2: name a .csv file"),
    ("{folder}", (".csv",), "--out {folder} is a folder; name a .csv file in it, e.g. --out {folder}/out.csv"),
])
def test_an_output_file_of_another_kind_is_refused(tmp_path, named, kinds, message):
    named = named.format(folder=tmp_path)
    with pytest.raises(UsageError) as e:
        output_file(named, "--out", kinds)
    assert str(e.value) == message.format(folder=tmp_path)


@pytest.mark.parametrize("named, message", [
    ("model.onnx", "--out model.onnx names a folder, not a .onnx file: give a folder name, e.g. --out model"),
    ("{file}", "--out {file} is a file; --out names a folder"),
])
def test_an_output_folder_named_like_a_file_is_refused(tmp_path, named, message):
    (tmp_path / "taken").write_text("")
    named = named.format(file=tmp_path / "taken")
    with pytest.raises(UsageError) as e:
        output_folder(named, "--out")
    assert str(e.value) == message.format(file=tmp_path / "taken")
    output_folder(str(tmp_path / "runs" / "v1.2"), "--out")  # a dot in a folder's name is fine


@pytest.mark.parametrize("script, args, line", [
    ("lr_find.py", ["--out", "lr.txt"], "--out lr.txt: name a .png or .svg or .pdf file"),
    ("show_batch.py", ["--out", "batch.jpg"], "--out batch.jpg: name a .png file"),
    ("predict.py", ["--checkpoint", "x.safetensors", "a.jpg", "--out", "preds.json"], "--out preds.json: name a "
                                                                                      ".csv file"),
    ("evaluate.py", ["--checkpoint", "x.safetensors", "--split", "val", "--out-dir", "metrics.json"],
     "--out-dir metrics.json names a folder, not a .json file: give a folder name, e.g. --out-dir metrics"),
    ("export.py", ["--checkpoint", "x.safetensors", "--out", "model.onnx"], "--out model.onnx names a folder"),
    ("make_shards.py", ["--out", "digits.tar"], "--out digits.tar names a folder, not a .tar file"),
    ("audit.py", [MISSING, "--report", "audit.txt"], "--report audit.txt: name a .json or .csv file"),
    ("prepare_demo.py", ["digits.png"], "dest digits.png names a folder, not a .png file"),
    ("search.py", ["--space", "s.toml", "--trials", "2", "--out", "study.csv"], "--out study.csv names a folder"),
])
def test_an_output_name_of_the_wrong_kind_is_refused_before_any_work(tmp_path, script, args, line):
    result = run_in_process(script, *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {line}"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_plots_named_without_an_extension_are_pngs(tmp_path):
    # The LR finder's and show_batch's outputs, which matplotlib names by their extension.
    images = make_image_folder(tmp_path / "images", per_class=4)
    run = [f"data.root={images}", "model.name=tiny_cnn", "data.image_size=16", "data.batch_size=4",
           "data.num_workers=0", "runtime.device=cpu", "data.audit=off"]
    result = run_in_process("lr_find.py", *run, "--steps", "3", "--out", "lr", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "lr").exists()
    assert result.stdout.splitlines()[-1] == "note: --out lr has no extension: wrote lr.png"
    result = run_in_process("show_batch.py", *run, "--count", "4", "--out", "batch", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "batch.png").read_bytes()[:4] == b"\x89PNG"
    assert "note: --out batch has no extension: wrote batch.png" in result.stdout
