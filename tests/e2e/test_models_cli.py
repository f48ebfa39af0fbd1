"""list_models.py as a subprocess (the name check in-process: one interpreter start fewer)."""


def test_models_cli_lists_and_checks_names(tmp_path):
    from helpers import run_in_process, run_script

    listed = run_script("list_models.py", "--search", "*resnet18", cwd=tmp_path)
    assert listed.returncode == 0
    names = listed.stdout.split()
    assert "torchvision/resnet18" in names and "timm/resnet18" in names
    unknown = run_in_process("list_models.py", "--check", "timm/resnet18x", cwd=tmp_path)
    assert unknown.returncode == 2 and "close matches: timm/resnet18" in unknown.stderr
