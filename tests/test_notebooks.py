"""The notebooks under notebooks/ run top to bottom (nbclient + ipykernel, a test-only
dependency) on a tiny run (an initialized network, checkpointed), pointed at it by their parameters (environment variables
SCORE_SDE_NB_*), with small sample counts."""

from __future__ import annotations

import math
import os
import re

import jax
import nbformat
import pytest
from nbclient import NotebookClient

from configs import fashion_mnist_vp
from score_sde.io import checkpoints
from score_sde.io import workdir as workdir_lib
from score_sde.run import experiment, programs

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny VP run on the synthetic 8x8 images, as load_run reads it: its config.json and one
# checkpoint (step 0, the initialized network: no train step to compile). One resolution,
# as tests/test_train.py's tiny run: each of the eight sampler programs the notebook runs
# compiles the network once, and what it checks does not depend on the network's shape.
TINY = {
    "data.dataset": "synthetic", "data.image_size": 8, "model.ch_mult": (1,),
    "model.attn_resolutions": (), "model.nf": 8,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  config = fashion_mnist_vp.get_config("tiny")
  for path, value in TINY.items():
    section, field = path.split(".")
    config[section][field] = value
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  workdir_lib.save_config(experiment.config_to_plain(config), workdir)
  state = programs.init_state(jax.random.PRNGKey(0), experiment.run_spec(config))
  with checkpoints.get_manager(workdir) as manager:
    checkpoints.save(manager, 0, state)
  return workdir


def _stdout(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", [])
                 if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_compare_samplers_notebook_runs_on_a_tiny_run(tiny_run, tmp_path, monkeypatch):
  # Four deterministic methods, two budgets, one grid for all (the default path, each
  # method's own grid, differs only in the options passed).
  methods, grid = ["ddim", "unipc", "deis", "heun"], "karras"
  for name, value in dict(WORKDIR=tiny_run, NUM_SAMPLES="8", NFE="3,5", GRID=grid,
                          METHODS=",".join(methods)).items():
    monkeypatch.setenv(f"SCORE_SDE_NB_{name}", value)
  monkeypatch.setenv("PYTHONPATH", _ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  path = os.path.join(_ROOT, "notebooks", "compare_samplers.ipynb")
  nb = nbformat.read(path, as_version=4)
  # Stored without outputs.
  assert all(not c.get("outputs") and c.get("execution_count") is None
             for c in nb.cells if c.cell_type == "code")
  NotebookClient(nb, timeout=1800, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()

  text = "\n".join(_stdout(c) for c in nb.cells if c.cell_type == "code")
  assert f"'WORKDIR': '{tiny_run}'" in text and "step 0" in text
  # One sampler run per method and budget it can meet (heun: 2 steps - 1 = 3 and 5), with
  # the grid asked for, and a finite FD for each in the table.
  fd = {(m, int(n)): float(v) for m, n, v in
        re.findall(r"^\| (\w+) \| (\d+) \| ([^|]+) \|$", text, flags=re.M)}
  assert set(fd) == {(m, n) for m in methods for n in (3, 5)}, sorted(fd)
  assert all(math.isfinite(v) and v >= 0 for v in fd.values()), fd
  runs = re.findall(r"^(\w+) +NFE +(\d+) .*options (.*)$", text, flags=re.M)
  assert len(runs) == len(fd)
  for _, _, options in runs:
    assert f"'grid': '{grid}'" in options, options
  # Three figures: the grids, FD against NFE, the samples.
  images = [o for c in nb.cells for o in c.get("outputs", [])
            if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
  assert len(images) == 3
