"""The documentation a new user reads: a short README whose commands are the ones CI runs, links that lead
somewhere, and a settings reference that is the code's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from shared.settings_reference import reference

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "k8s" / "README.md",
         REPO / "benchmarks" / "README.md"]  # fmt: skip
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    links = [link for link in LINK.findall(text) if not re.match(r"[a-z]+:", link)]
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no {target.relative_to(REPO) if target.is_relative_to(REPO) else target}")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not broken, broken


def test_the_readme_is_short_and_every_docs_page_is_linked_from_it() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 12 * 1024
    linked = {link.partition("#")[0] for link in LINK.findall(readme)}
    assert {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= linked


def two_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_the_readme_commands_are_the_ones_ci_runs() -> None:
    """Install and tests as CI runs them; the main job on both folders, then the API."""
    install, main_job, tests = two_commands()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for part in install.split(" && "):
        assert part.replace(" -q", "") in ci.replace(" -q", ""), part
    assert tests in ci.splitlines(), tests
    trainer, api = main_job.split(" && ")
    assert shlex.split(trainer)[:4] == [".venv/bin/python", "-m", "services.trainer", "run"]
    assert shlex.split(api)[:3] == [".venv/bin/python", "-m", "services.api"]
    sources = shlex.split(trainer)[4:]
    assert sources == [
        "--if-needed",
        "--source",
        "../shared/data/dandelion-grass",
        "--source",
        "../shared/data/flowers",
    ]


def test_the_configuration_page_is_generated_from_the_settings() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == reference(), "run: python -m shared.settings_reference > docs/configuration.md"
