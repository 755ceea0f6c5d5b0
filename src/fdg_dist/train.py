"""``python -m fdg_dist.train`` = ``fdg-train``: the Hydra entry (see ``cli``).

An entry point only: nothing imports this module, and it must not grow code of its own.
"""

from fdg_dist.cli import main

if __name__ == "__main__":
    main()
