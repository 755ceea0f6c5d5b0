"""``fdg-train --help`` explains every key, from the schema itself (issue 29)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from conftest import REPO

from fdg_dist.config import Config, describe, schema


def test_every_key_has_a_one_line_description_from_its_field() -> None:
    """A field added to the schema without a comment on its line fails here: the help cannot drift."""
    keys = describe.all_keys()
    sections = [f.name for f in dataclasses.fields(Config)]
    assert len(keys) == sum(len(dataclasses.fields(f.default_factory)) - (f.name == "model")
                            if dataclasses.is_dataclass(f.default_factory) else 1 for f in dataclasses.fields(Config))
    assert [k.name for k in keys if not k.description] == []
    assert {k.name.split(".")[0] for k in keys} == set(sections)
    beta = next(k for k in keys if k.name == "method.beta")
    assert beta.description == "fdg, adl: the shrinking factor of the delayed gradient, in (0, 1]"
    assert "pipeline.k" in describe.help_text() and "$" not in describe.help_text().replace("$$", "")
    assert schema.PipelineConfig.__name__ in {c for c, _ in describe._comments()}


def test_a_typo_gets_the_closest_key_of_its_own_section_first() -> None:
    assert describe.closest("pipeline.kk")[0] == "pipeline.k"
    assert describe.closest("optim.momentun")[0] == "optim.momentum"
    assert describe.closest("zzzz") == []


@pytest.mark.timeout(150)
def test_help_lists_the_groups_with_their_choices_and_describes_every_key() -> None:
    proc = subprocess.run([sys.executable, "-m", "fdg_dist.train", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # an import of torch and Hydra: seconds, a minute on a loaded machine
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "method: adl, bp, ddg, dgl, dp, fdg, fr" in out and "model: custom, gpt," in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    for key in describe.all_keys():
        assert key.name in lines and lines[key.name].endswith(key.description), key.name
    assert "method.beta" in lines and "shrinking factor" in lines["method.beta"]
