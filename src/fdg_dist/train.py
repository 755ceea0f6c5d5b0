"""``python -m fdg_dist.train`` = ``fdg-train``: the Hydra entry (see ``cli``)."""

from fdg_dist.cli import main

if __name__ == "__main__":
    main()
