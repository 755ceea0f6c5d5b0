"""Where the network is cut (layer 3): block costs and the split (``partition``), the pace a split runs at
(``pace``), and the pure rule that picks among measured candidates (``choice``).

Pure functions: no process group, no files.  Timing enters only where asked (``pipeline.cost=time``: the
measured times are handed in).  Must not import observe, run or the entry points.
"""
