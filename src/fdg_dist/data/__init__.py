"""Inputs (layer 1): datasets as in-memory tensors and reproducible epochs of batches over them.

Must not know about pipelines, stages or process groups; imports only ``config`` and ``util``.
"""

from fdg_dist.data.images import *  # noqa: F403  (split by kind in the next commit)
from fdg_dist.data.images import _subset  # noqa: F401
