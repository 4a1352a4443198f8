"""Runs: the only code that reads a ConfigDict.

The config edge (`experiment`: config -> frozen specs, every section's checks), the compiled
programs, the train loop, classifier training, evaluation, sampling and guided sampling,
sample quality and the import of reference checkpoints. `score_sde.main` is the command line
over these modules.
"""

# The public entry points, imported on first use (so that `import score_sde.run.cli` stays
# light for the command-line tools): name -> the module that defines it.
_EXPORTS = {"load_run": "programs", "Run": "programs", "load_autoencoder": "autoencoder",
            "Autoencoder": "autoencoder"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
  """`score_sde.run.load_run` / `Run` (run.programs) and `load_autoencoder` / `Autoencoder`
  (run.autoencoder)."""
  if name in _EXPORTS:
    import importlib
    return getattr(importlib.import_module(f"score_sde.run.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'score_sde.run' has no attribute {name!r}")
