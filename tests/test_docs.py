"""The manual stays in step with the code: each stage page's key table is the one `llama2 <stage> --keys` prints,
every relative link resolves, and the README stays a map.

`python tests/test_docs.py` rewrites the generated tables in docs/ (after a recipe key changed)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TABLE = re.compile(r"<!-- keys: (?P<stage>[\w-]+) -->\n(?P<table>.*?)\n<!-- /keys -->", re.S)
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def generated_table(stage: str) -> str:
    from llama2.pipeline import STAGES
    from llama2.recipe import keys_table

    return keys_table(STAGES[stage].recipe)


def test_every_stage_page_has_the_key_table_the_command_prints():
    from llama2.pipeline import STAGES

    found = {}
    for page in DOCS.glob("*.md"):
        for m in TABLE.finditer(page.read_text()):
            found[m["stage"]] = (page, m["table"])
    assert set(found) == set(STAGES), f"stages without a generated key table in docs/: {set(STAGES) - set(found)}"
    for stage, (page, table) in found.items():
        assert table == generated_table(stage), (f"{page.name}: the `{stage}` key table is stale; regenerate it with "
                                                 "`python tests/test_docs.py`")


def test_the_command_prints_the_same_table(capsys):
    from llama2.cli import main

    assert main(["rlhf", "ppo", "--keys"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == generated_table("ppo")
    assert "| `beta` | a number | `0.01` | KL penalty to the initial policy pi_0" in out  # the paper's beta for 7B


@pytest.mark.parametrize("page", sorted(p.name for p in [ROOT / "README.md", *DOCS.glob("*.md")]))
def test_relative_links_resolve(page):
    path = ROOT / page if (ROOT / page).is_file() else DOCS / page
    for target, _ in LINK.findall(path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"


def test_readme_is_a_map():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move the manual into docs/"
    text = "\n".join(lines)
    assert "./run demo" in text and "./run test" in text


def regenerate() -> None:
    for page in DOCS.glob("*.md"):
        text = page.read_text()
        new = TABLE.sub(lambda m: f"<!-- keys: {m['stage']} -->\n{generated_table(m['stage'])}\n<!-- /keys -->", text)
        if new != text:
            page.write_text(new)
            print(f"rewrote the key tables of {page.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(regenerate())
