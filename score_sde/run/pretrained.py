"""Trained models shipped with the package, loaded by name with a SHA-256 check.

    run = load_pretrained("NAME")            # a programs.Run: run.score_fn(), run.spec.sde, ...
    python scripts/compare_samplers.py --model=NAME

A model is one `.npz` under `score_sde/assets/pretrained/` (or any path): the EMA variables as
float32 arrays named by their '/'-joined paths ('params/...', 'constants/...'), and the run's
whole config as JSON (entry `CONFIG_ENTRY`), so one digest covers both the weights and the
config they belong to. `MODELS` is the explicit registry name -> `Pretrained(file, sha256,
config, ...)`; `save_pretrained` writes such a file from a run and returns its digest.

Two models are registered: the Fashion-MNIST demo's VP DDPM++ (`fashion_mnist_vp`) and its
rectified-flow twin (`fashion_mnist_rf`), each trained 12,750 steps of batch 64 (148 minutes
wall, both at once, one simulated device each, niced beside other work on the 2-core machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from score_sde import models
from score_sde.checks import check_choice
from score_sde.run import experiment, programs

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "assets", "pretrained")
CONFIG_ENTRY = "__config_json__"


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """One registry entry.

  Attributes:
    file: the .npz, relative to `ASSETS_DIR` (or absolute).
    sha256: its expected hex SHA-256.
    config: the experiment config it was trained from (e.g. 'configs/fashion_mnist_rf.py');
      informational: the config used is the one inside the file.
    step: the training step of the weights.
    description: how it was trained (steps, batch, time, machine).
  """
  file: str
  sha256: str
  config: str
  step: int
  description: str = ""


# name -> entry. Add a model with `save_pretrained` (it prints the digest).
MODELS: dict[str, Pretrained] = {
    "fashion_mnist_vp": Pretrained(
        file="fashion_mnist_vp.npz",
        sha256="3439b651ff5326c6291c37849f02fa04f17d9f15834c2310456167e966eed330",
        config="configs/fashion_mnist_vp.py", step=12750,
        description="VP SDE, v-prediction DDPM++ (317k parameters), 12,750 steps of batch 64, "
                    "EMA 0.999; 148 min wall on one simulated CPU device, niced, beside the "
                    "RF run and other work on 2 cores"),
    "fashion_mnist_rf": Pretrained(
        file="fashion_mnist_rf.npz",
        sha256="9263b5150926f3cb0fb99ff6010376d9ad54b30d5cdabf44c09df52a48938018",
        config="configs/fashion_mnist_rf.py", step=12750,
        description="rectified flow, velocity DDPM++ (317k parameters), flow-matching loss at "
                    "logit-normal times, 12,750 steps of batch 64, EMA 0.999; 148 min wall on "
                    "one simulated CPU device, niced, beside the VP run and other work"),
}


def sha256_of_file(path: str) -> str:
  """Hex SHA-256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def save_pretrained(run: programs.Run, path: str) -> str:
  """Writes `run`'s EMA variables and config as a model file; returns its SHA-256."""
  flat = traverse_util.flatten_dict(jax.device_get(run.variables(ema=True)), sep="/")
  arrays = {k: np.asarray(v, np.float32) for k, v in sorted(flat.items())}
  config_json = json.dumps(experiment.config_to_plain(run.config), sort_keys=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **arrays, **{CONFIG_ENTRY: np.asarray(config_json)})
  return sha256_of_file(path)


def model_path(entry: Pretrained) -> str:
  return entry.file if os.path.isabs(entry.file) else os.path.join(ASSETS_DIR, entry.file)


def load_pretrained(name: str, *, registry: dict[str, Pretrained] | None = None
                    ) -> programs.Run:
  """The registered model `name` as a `programs.Run` (EMA weights; `run.score_fn()`).

  Args:
    name: a key of `registry`.
    registry: name -> `Pretrained` (default `MODELS`).

  Raises:
    ValueError: an unknown name (listing the registered ones); a file whose SHA-256 differs
      from the registry's (naming the file, the expected and the actual digest), checked
      before the file is parsed; arrays that do not fit the network of the file's config.
    FileNotFoundError: the registered file is missing.
  """
  registry = MODELS if registry is None else registry
  check_choice("pretrained model", name, registry)
  entry = registry[name]
  path = model_path(entry)
  if not os.path.exists(path):
    raise FileNotFoundError(f"pretrained model {name!r}: file {path} not found (it ships with "
                            f"the package; reinstall it)")
  actual = sha256_of_file(path)
  if actual != entry.sha256:
    raise ValueError(f"pretrained model {name!r}: {path} has SHA-256 {actual}, expected "
                     f"{entry.sha256}: a corrupt or different file")
  with np.load(path, allow_pickle=False) as f:
    config = experiment.config_from_plain(json.loads(str(f[CONFIG_ENTRY])))
    flat = {k: jnp.asarray(f[k]) for k in f.files if k != CONFIG_ENTRY}
  spec = experiment.run_spec(config)
  reference = jax.eval_shape(
      lambda: models.init_network(jax.random.PRNGKey(0), spec.model, spec.image_shape))
  want = {k: v.shape for k, v in traverse_util.flatten_dict(reference, sep="/").items()}
  got = {k: v.shape for k, v in flat.items()}
  if want != got:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    raise ValueError(f"pretrained model {name!r}: {path} does not fit the network of its "
                     f"config (missing {missing[:3]}, unexpected {extra[:3]}, other shapes "
                     f"{shapes[:3]})")
  variables = traverse_util.unflatten_dict(flat, sep="/")
  params = variables.pop("params")
  state = programs.TrainState(step=jnp.asarray(entry.step, jnp.int32), params=params,
                              opt_state=(), ema_params=params, constants=variables)
  return programs.Run(workdir=path, config=config, step=int(entry.step), spec=spec,
                      state=state)
