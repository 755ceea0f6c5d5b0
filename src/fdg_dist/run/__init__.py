"""One rank's life (layer 5): process groups and rendezvous, the worker, the trainer (build → resume →
epochs → export), checkpoints and re-cutting, the run directory, preemption, device defaults, and the measured
split trial.

Files, locks, signals and process groups live here.  Must not know a method's tick rule (that is
``engine.schedule``'s), nor import the entry points (cli, validation, inference, convert, sweep).
"""
