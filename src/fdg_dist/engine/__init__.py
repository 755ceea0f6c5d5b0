"""The FDG rule and its family (layer 2): tick rules as data (``schedule``), one module's compute
(``stage``), the walk that joins them (``executor``) over wires (``transport``, emulated by ``fabric``), the
single-process oracle (``reference``), staleness correctors and probes, finiteness, loss and optimizers.

Exact and testable without a process group.  Must not read files, Hydra or configs beyond the dataclasses of
``config``, nor import anything above: split, observe, run and the entry points build on it.
"""
