"""Every relative link in the project's Markdown points at a file that exists, and at a heading that exists.

The READMEs carry the measured numbers and cross-reference each other by section; a section
renamed or dropped in one file must not leave a dead link in another.
"""

from __future__ import annotations

import re
import subprocess

import pytest

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path) -> set[str]:
    in_code = False
    anchors = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := HEADING.match(line)):
            anchors.add(github_anchor(match.group(1)))
    return anchors


def markdown_files(repo_root):
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=repo_root, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [repo_root / name for name in listed.stdout.split()]


def test_github_anchor_matches_githubs_rule():
    assert github_anchor("Flip test-time augmentation (measured, session 3)") == \
        "flip-test-time-augmentation-measured-session-3"
    assert github_anchor("`relseg train`: stage 2") == "relseg-train-stage-2"


def test_relative_links_and_their_anchors_resolve(repo_root):
    broken = []
    for path in markdown_files(repo_root):
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked here
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.relative_to(repo_root)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
                broken.append(f"{path.relative_to(repo_root)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
