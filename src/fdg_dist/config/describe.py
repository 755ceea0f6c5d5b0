"""Every config key with its one-line description, read from the schema itself.

``fdg-train --help`` prints them and an unknown key is answered with the closest of them, so both come from
``schema.py``: a key's description is the comment on its field's line there (every field has one; a test
fails otherwise), Nothing to keep in step by hand.  Must not import
anything of fdg_dist but the schema.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import tokenize
from dataclasses import dataclass
from functools import cache

from fdg_dist.config import schema

FREE_SECTION = "model"  # besides name, _target_ and variant, any model.<arg> is an argument of the builder


@dataclass(frozen=True)
class Key:
    name: str  # dotted: "pipeline.k", "resume"
    description: str


@cache
def _comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment on that field's line in schema.py."""
    source = inspect.getsource(schema)
    by_line = {tok.start[0]: tok.string.lstrip("#").strip()
               for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    found[node.name, item.target.id] = by_line.get(item.lineno, "")
    return found


@cache
def all_keys() -> tuple[Key, ...]:
    """Every key a command line may set, in the schema's order (a section's keys after its name)."""
    comments = _comments()
    out = []
    for top in dataclasses.fields(schema.Config):
        cls = top.default_factory  # a section (a dataclass): its keys
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if not (cls is schema.ModelConfig and f.name == "args"):
                    out.append(Key(f"{top.name}.{f.name}", comments.get((cls.__name__, f.name), "")))
        else:
            out.append(Key(top.name, comments.get(("Config", top.name), "")))
    return tuple(out)


def closest(key: str) -> list[str]:
    """The valid keys nearest to ``key`` (a typo), best first: those of its own section before the others."""
    names = [k.name for k in all_keys()]
    section = key.split(".")[0]
    own = [n for n in names if n.startswith(section + ".")]
    return difflib.get_close_matches(key, own, n=3, cutoff=0.6) or difflib.get_close_matches(key, names, n=3, cutoff=0.6)


def help_text() -> str:
    """The keys for ``fdg-train --help``, each with what it does (the values a command runs with follow, in
    Hydra's config dump).  ``$`` is doubled: Hydra fills the help template with ``string.Template``."""
    width = max(len(k.name) for k in all_keys())
    return "\n".join(f"  {k.name:<{width}}  {k.description}" for k in all_keys()).replace("$", "$$")
