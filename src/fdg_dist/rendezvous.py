"""``python -m fdg_dist.rendezvous [torchrun arguments]``: torchrun with the ``fdg-c10d`` rendezvous backend.

The command users and the launch scripts type; the code is ``fdg_dist.run.rendezvous``.  An entry point only:
nothing imports this module, and it must not grow code of its own.
"""

from fdg_dist.run.rendezvous import main

if __name__ == "__main__":
    main()
