"""Runs: the only code that reads a ConfigDict.

The config edge (`experiment`: config -> frozen specs, every section's checks), the compiled
programs, the train loop, classifier training, evaluation, sampling and guided sampling,
sample quality and the import of reference checkpoints. `score_sde.main` is the command line
over these modules.
"""

__all__ = ["Autoencoder", "load_autoencoder"]


def __getattr__(name: str):
  """`score_sde.run.load_autoencoder` / `Autoencoder`, imported on first use (so that
  `import score_sde.run.cli` stays light for the command-line tools)."""
  if name in __all__:
    from score_sde.run import autoencoder
    return getattr(autoencoder, name)
  raise AttributeError(f"module 'score_sde.run' has no attribute {name!r}")
