"""The model card's source revision: the one a checkout can reproduce the run from, and says when it cannot."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.trainer import modelcard


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_revision_is_the_commit_and_says_when_the_code_differs_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    (repo / "services").mkdir(parents=True)
    (repo / "services" / "code.py").write_text("A = 1\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "empty")
    git(repo, "add", ".")
    git(repo, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "code")
    monkeypatch.setattr(modelcard, "REPOSITORY", repo)
    head = git(repo, "rev-parse", "HEAD")
    assert modelcard.revision() == head
    (repo / "notes.txt").write_text("not code, not tracked")
    assert modelcard.revision() == head
    (repo / "services" / "code.py").write_text("A = 2\n")
    assert modelcard.revision() == f"{head} +uncommitted changes"
    assert modelcard.revision("v1.2.3") == "v1.2.3"  # what an image was built from wins
    monkeypatch.setattr(modelcard, "REPOSITORY", tmp_path)  # not a checkout
    assert modelcard.revision() == "unknown"
