"""Runs: the only code that reads a ConfigDict.

The config edge (`experiment`: config -> frozen specs, every section's checks), the compiled
programs, the train loop, classifier training, evaluation, sampling and guided sampling,
sample quality and the import of reference checkpoints. `score_sde.main` is the command line
over these modules.
"""
