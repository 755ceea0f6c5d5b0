"""Error messages in one line: what the CLI prints of a worker's failure and what data says of a bad file.

Must not import any other part of fdg_dist.
"""

from __future__ import annotations

import re


def first_line(text: str) -> str:
    """An error message in one line (its first), without torchvision's C++ location prefix
    (``decode_jpeg, …/x.cpp:171, ``)."""
    line = text.strip().splitlines()[0] if text.strip() else "no reason given"
    return re.sub(r"^\w+, \S+\.cpp:\d+, ", "", line)
