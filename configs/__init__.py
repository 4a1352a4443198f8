"""Experiment configs: `get_config(arg=None) -> ml_collections.ConfigDict` per file.

`default.py` holds every field and its default; an experiment file starts from `default` (or
from the experiment it varies) and sets only what differs. `get_config('tiny')` gives a
seconds-long run of the same experiment (small network and batch) for tests and smoke runs.
"""
