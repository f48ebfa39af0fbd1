"""README.md and docs/: the generated key reference is current, links and named files exist, each
fact has one home. Text only: nothing here imports torch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from configs.reference import REGENERATE, render
from configs.schema import all_keys, read_config

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
EXIT_CODES_PAGE = DOCS / "resume-and-faults.md"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A path into this repository's code, named in prose or a command: launch/train.py, configs/demo.toml
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:launch|configs|benchmarks|trainer|data|models|tests)/[\w/.-]*\.(?:py|toml|sbatch))")


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _text_outside_code(page: Path) -> str:
    """The page without fenced code blocks (a `# comment` there is not a heading)."""
    return re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", _text_outside_code(page), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_configuration_reference_is_generated_from_the_schema():
    current = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert current == render(), f"docs/configuration.md is out of date with configs/schema.py: run `{REGENERATE}`"


def test_every_key_is_in_the_reference():
    reference = (DOCS / "configuration.md").read_text(encoding="utf-8")
    missing = [key for key in all_keys() if f"| `{key}` |" not in reference]
    assert not missing, f"keys missing from docs/configuration.md: {missing}; run `{REGENERATE}`"


def test_readme_is_a_first_screen():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 170, f"README.md has {lines} lines; move detail to a page in docs/ and link it"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_to_files_and_headings_that_exist(page):
    broken = []
    for target in LINK.findall(_text_outside_code(page)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(REPO) if file.is_relative_to(REPO) else file})")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {_rel(file)})")
    assert not broken, f"{_rel(page)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_scripts_and_configs_exist(page):
    named = set(REPO_PATH.findall(page.read_text(encoding="utf-8")))
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"{_rel(page)} names files that do not exist: {missing}"


def test_files_in_the_readme_layout_exist():
    """Each layout row names files of its folder; a renamed file must not leave a stale name behind."""
    rows = re.findall(r"^\| `([\w/]+/)`[^|]* \| (.*) \|$", README.read_text(encoding="utf-8"), flags=re.M)
    assert len(rows) >= 8, "README.md's layout table was not found"
    missing = [f"{folder}{name}" for folder, cell in rows for name in re.findall(r"`([\w.]+\.(?:py|sbatch))`", cell)
               if not list((REPO / folder).rglob(name))]
    assert not missing, f"README.md's layout names files that do not exist: {missing}"


def test_every_recipe_config_is_in_the_recipes_table():
    text = (DOCS / "fine-tuning.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `([\w.-]+\.toml)` \|", text, flags=re.M))
    shipped = {p.name for p in (REPO / "configs").glob("*.toml")}
    assert table == shipped, (f"docs/fine-tuning.md#recipes lists {sorted(table - shipped)} that configs/ lacks "
                              f"and lacks {sorted(shipped - table)}")


def test_every_docs_page_is_in_the_index():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    linked = set(LINK.findall(index))
    pages = {p.name for p in DOCS.glob("*.md") if p.name != "README.md"}
    assert not pages - linked, f"docs/README.md does not link {sorted(pages - linked)}"


def test_exit_codes_are_explained_in_one_page():
    table_row = re.compile(r"^\| *75 *\|", flags=re.M)
    prose = re.compile(r"\b(?:exit code|exits? with code|exit|code)s?\s+75\b", flags=re.I)
    pages = [_rel(p) for p in PAGES if table_row.search(p.read_text(encoding="utf-8"))]
    assert pages == [_rel(EXIT_CODES_PAGE)], f"the exit-code table must be in {_rel(EXIT_CODES_PAGE)} only: {pages}"
    elsewhere = [_rel(p) for p in PAGES if p != EXIT_CODES_PAGE and prose.search(p.read_text(encoding="utf-8"))]
    assert not elsewhere, f"exit code 75 explained outside {_rel(EXIT_CODES_PAGE)}: {elsewhere}; link to it instead"


def test_the_readme_config_is_valid(tmp_path):
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^```toml\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks, "README.md shows no ```toml config"
    for i, block in enumerate(blocks):
        path = tmp_path / f"readme_{i}.toml"
        path.write_text(block, encoding="utf-8")
        read_config(path)  # raises ConfigError naming the key
