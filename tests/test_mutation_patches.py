"""Every deliberate bug in tests/mutations still applies to the code (``git apply --check``), names the tests
that catch it, and those tests exist: a patch that no longer applies checks nothing, and one did drift once
(warmup_forward_shifted, after the executor's loop was reworked).  Running the catches is
``python tests/mutations/check.py`` (minutes); this only keeps the patches honest."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

PATCHES = sorted((REPO / "tests" / "mutations").glob("*.patch"))


def test_there_are_patches() -> None:
    assert len(PATCHES) >= 20


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.stem)
def test_the_patch_applies_and_names_tests_that_exist(patch: Path) -> None:
    check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    caught = re.search(r"^Caught by: (.+)$", patch.read_text(), re.MULTILINE)
    assert caught, "no 'Caught by:' line"
    for node in caught.group(1).split():
        file, _, name = node.partition("::")  # a whole file, or one test (with its parameters)
        assert (REPO / file).exists(), node
        if name:
            assert re.search(rf"^def {re.escape(name.split('[')[0])}\(", (REPO / file).read_text(), re.MULTILINE), node
