"""Mutation check: does the suite fail when the code is wrong?

Each ``NAME.patch`` here is one deliberate bug: a line saying what it breaks, a line ``Caught by: TEST…``
(pytest node ids) and a unified diff against the repository root.  For each one this script copies the
working tree (tracked and untracked files, not ignored ones) to a scratch directory, applies the patch
there and runs the tests named to catch it; the mutation is caught when they fail (pytest exit 1).
Nothing in the working tree is touched.

    python tests/mutations/check.py                          # every patch here
    python tests/mutations/check.py staleness_is_the_stash_depth --baseline

``--baseline`` first runs the same tests on the unmodified copy, which must pass (else a "caught" means
nothing).  Exit status 1 when a mutation is missed or its patch no longer applies.  Slow (the tests are
multi-process runs): not part of the default suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def scratch_copy(dest: Path) -> Path:
    """The working tree as it is now (uncommitted edits included) under ``dest``, with the repository's
    neighbour ``shared/`` (where the tests find the real data) beside it."""
    shared = REPO.parent / "shared"
    if shared.exists():
        (dest.parent / "shared").symlink_to(shared)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src, dst = REPO / name, dest / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return dest


def caught_by(patch: Path) -> list[str]:
    for line in patch.read_text().splitlines():
        if line.startswith("Caught by:"):
            return line.removeprefix("Caught by:").split()
    raise SystemExit(f"{patch}: no 'Caught by:' line naming the tests")


def run_tests(tree: Path, tests: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def check(patch: Path, baseline: bool) -> str:
    tests = caught_by(patch)
    with tempfile.TemporaryDirectory(prefix=f"mutation_{patch.stem}_") as tmp:
        tree = scratch_copy(Path(tmp) / "tree")
        if baseline and (rc := run_tests(tree, tests)) != 0:
            return f"baseline fails (pytest exit {rc}): fix the tests first"
        applied = subprocess.run(["git", "apply", str(patch)], cwd=tree, capture_output=True, text=True)
        if applied.returncode != 0:
            return f"STALE: the patch no longer applies: {applied.stderr.strip()}"
        rc = run_tests(tree, tests)
    return "caught" if rc == 1 else f"MISSED (pytest exit {rc})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="patch names without .patch (default: all)")
    parser.add_argument("--baseline", action="store_true", help="first check that the tests pass unmutated")
    args = parser.parse_args()
    patches = [HERE / f"{n}.patch" for n in args.names] or sorted(HERE.glob("*.patch"))
    failed = False
    for patch in patches:
        verdict = check(patch, args.baseline)
        failed |= verdict != "caught"
        print(f"{patch.stem:40s} {verdict}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
