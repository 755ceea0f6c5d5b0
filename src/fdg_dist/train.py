"""``fdg-train`` and ``python -m fdg_dist.train``: the entry point (the launcher is ``cli``).

It starts the warm fork server (``run.warm``) before it imports the launcher, so that the server's imports
(torch, the worker, the meta kernels) run on one core while the launcher's own run on another; a torchrun
worker, and a command that only asks for help, start none.  So the launcher is imported inside ``main``: the
other function-local import the layer rules allow (tests/test_layers.py).

Must not grow launcher code (that is ``cli``'s), nor side effects at its top level: every process forked or spawned for a run
imports it again as ``__mp_main__``.
"""

import sys

from fdg_dist.run import warm

# What the warm server imports once for every process it forks: the launcher (with the worker, torch and
# Hydra), and what torch loads on a model's first operation on the meta device (sympy, torch.fx and
# torch._dynamo: ~2 s cold), which the configuration check and the counted split both make.
PRELOAD = ("fdg_dist.cli", "torch.fx.experimental.symbolic_shapes", "torch._dynamo")
_ONLY_ANSWERS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc"}


def main() -> None:
    if not warm.under_torchrun() and _ONLY_ANSWERS.isdisjoint(sys.argv[1:]):
        warm.start(PRELOAD)
    from fdg_dist.cli import main as launch

    launch()


if __name__ == "__main__":
    main()
