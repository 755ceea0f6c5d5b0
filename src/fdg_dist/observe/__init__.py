"""What a person reads (layer 4): the console, ``metrics.jsonl``, ``result.json``, TensorBoard, ``timing/``,
the trace, each rank's memory, and ``fdg-report``.

Reads what the engine hands it (events, results, probes); must not change training, nor import run or the
entry points.
"""
