"""README.md and docs/*.md stay true to the code: every relative link reaches its file and heading, every
``fdg-train`` command in a fenced bash block composes against ``conf/`` and passes the project's validation
(as ``fdg-train`` does before it starts a worker; nothing trains), and README stays a short front door that
holds the test command CI runs."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import REPO, readme_example
from hydra import compose, initialize_config_dir

from fdg_dist.cli import config_from_hydra  # also registers the resolvers conf/ uses
from fdg_dist.validation import validate

if TYPE_CHECKING:
    from fdg_dist.config import Config

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _prose(text: str) -> str:
    """The page without fenced blocks, inline code and HTML comments: where links and headings are."""
    text = FENCE.sub("", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"`([^`]*)`", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug, n = _slug(heading), 1
        while slug in anchors:  # GitHub numbers repeated headings: x, x-1, x-2
            slug, n = f"{_slug(heading)}-{n}", n + 1
        anchors.add(slug)
    return anchors


def _links() -> Iterator[tuple[Path, str]]:
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text())):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked
                yield page, target


@pytest.mark.parametrize(("page", "target"), list(_links()),
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_relative_link_reaches_its_file_and_heading(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{page.relative_to(REPO)}: link to {target!r}: {file} does not exist"
    if anchor:
        assert file.suffix == ".md", f"{page.relative_to(REPO)}: link to {target!r}: an anchor into a non-page"
        assert anchor in _anchors(file), (f"{page.relative_to(REPO)}: link to {target!r}: {file.name} has no "
                                          f"heading with that anchor; it has {sorted(_anchors(file))}")


def test_the_readme_links_every_docs_page_and_every_page_links_back() -> None:
    readme = README.read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README.md's table of docs/ pages lacks {page.name}"
        assert "](../README.md)" in page.read_text(), f"docs/{page.name} does not link back to the README"


def test_the_readme_is_a_front_door_that_holds_the_test_command_ci_runs() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference material to docs/"
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith("python -m pytest")]
    assert ci, ".ci/run runs no 'python -m pytest' command"
    commands = [line.strip() for lang, body in FENCE.findall(README.read_text()) if lang.strip() == "bash"
                for line in body.splitlines()]
    assert ci[-1] in commands, f"README.md has no fenced bash line {ci[-1]!r}, the test command .ci/run runs"


# ----------------------------------------------------------------------------------- documented commands
def _commands() -> Iterator[tuple[str, list[str]]]:
    """(where, arguments) of every fdg-train command line in a fenced bash block, continuations joined."""
    for page in PAGES:
        text = page.read_text()
        for block in FENCE.finditer(text):
            if block.group(1).strip() != "bash":
                continue
            first_line = text.count("\n", 0, block.start(2)) + 1
            logical, start = "", first_line
            for n, line in enumerate(block.group(2).splitlines(), first_line):
                start = start if logical else n
                if line.rstrip().endswith("\\"):
                    logical += line.rstrip()[:-1] + " "
                    continue
                tokens, logical = shlex.split(logical + line, comments=True), ""
                while tokens and ASSIGNMENT.match(tokens[0]):  # VAR=value fdg-train …
                    tokens.pop(0)
                if tokens and tokens[0] == "fdg-train":
                    yield f"{page.relative_to(REPO)}:{start}", tokens[1:]


def _top_level_split(value: str) -> list[str]:
    """A sweep's values: ``a,b`` is two, ``[0,3],[0,4]`` is two, ``[0,3]`` one."""
    parts, depth, current = [], 0, ""
    for ch in value:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def _points(args: list[str]) -> list[list[str]]:
    """The overrides to compose: the command itself, or for a ``-m`` sweep its first point and, for every
    swept key, each of its other values beside the others' first (every value checked once)."""
    if not {"-m", "--multirun"} & set(args):
        return [args]
    args = [a for a in args if a not in ("-m", "--multirun")]
    choices = [[a] if "=" not in a else [f"{a.split('=', 1)[0]}={v}" for v in _top_level_split(a.split("=", 1)[1])]
               for a in args]
    first = [c[0] for c in choices]
    return [first] + [first[:i] + [other] + first[i + 1:] for i, c in enumerate(choices) for other in c[1:]]


COMMANDS = list(_commands())


def test_the_docs_show_commands() -> None:
    """The parser finds what the pages hold (a broken fence would silently check nothing)."""
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"README.md", "docs/configuration.md", "docs/models.md", "docs/budget-reproduction.md"} <= where, where
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.fixture(scope="module")
def hydra_conf() -> Iterator[None]:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield


def _stand_in_data(cfg: Config, folder: Path) -> None:
    """A data root the docs name but this machine lacks (``/path/to/cifar10``, ``../shared/...``) becomes a
    stand-in of the shape validation checks: an ImageFolder's class folders, a text file of the right
    alphabet. CIFAR roots are not read before a worker starts, so they stay as written."""
    d = cfg.data
    if d.root is None or d.name not in ("imagefolder", "text"):
        return
    here = REPO / d.root
    if here.exists():
        d.root = str(here)
    elif d.name == "imagefolder":
        for split in ("train", "val"):
            (folder / "images" / split / "class0").mkdir(parents=True, exist_ok=True)
        d.root = str(folder / "images")
    else:
        symbols = 256 if d.tokens == "byte" else d.num_classes
        alphabet = "".join(chr(0x100 + i) for i in range(symbols))  # distinct characters, any count
        text = folder / "input.txt"
        text.write_bytes(bytes(range(256)) * 64 if d.tokens == "byte" else
                         (alphabet * (1 + int(20 * (d.context + 1) / d.val_fraction) // symbols)).encode())
        d.root = str(text)


@pytest.mark.parametrize(("where", "args"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_documented_command_composes_and_validates(hydra_conf: None, where: str, args: list[str],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    placeholders = [a for a in args if "…" in a or "..." in a]
    assert not placeholders, f"{where}: {placeholders} in a fenced command: write a whole command, or move it to prose"
    monkeypatch.chdir(tmp_path)  # paths a previous command would have made (resume=runs/...) are made here
    (tmp_path / "my_model.py").write_text(readme_example()[0])  # the own model the docs define
    monkeypatch.syspath_prepend(str(tmp_path))
    for overrides in _points(args):
        cfg = config_from_hydra(compose(config_name="train", overrides=overrides))
        _stand_in_data(cfg, tmp_path)
        if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_absolute():
            (tmp_path / cfg.resume).mkdir(parents=True, exist_ok=True)
        validate(cfg)


@pytest.mark.parametrize(("args", "points"), [
    (["a=1"], [["a=1"]]),
    (["-m", "a=1,2", "b=[0,3]", "c=x,y,z"], [["a=1", "b=[0,3]", "c=x"], ["a=2", "b=[0,3]", "c=x"],
                                             ["a=1", "b=[0,3]", "c=y"], ["a=1", "b=[0,3]", "c=z"]]),
])
def test_a_sweep_is_checked_at_each_value_of_each_key(args: list[str], points: list[list[str]]) -> None:
    assert _points(args) == points
