"""Helpers genuinely shared by several layers (layer 0): files written whole or not at all, their hashes, and
errors in one line.

Must not import any other part of fdg_dist, nor know what the files it writes mean.
"""
