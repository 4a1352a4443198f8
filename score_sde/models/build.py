"""The networks by name, their compute precision, initialization and parameter count.

No config here: `score_sde.run.networks` builds a network of `MODELS` from `config.model`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.checks import check_choice
from score_sde.models.ddpm import DDPM
from score_sde.models.dit import DiT
from score_sde.models.ncsnpp import NCSNpp

Variables = dict[str, Any]


# name -> network class. `score_sde.run.networks` reads each class's fields from a config;
# 'ddpmpp' is NCSN++ with DDPM++ options (set by the config), an alias.
MODELS: dict[str, type[nn.Module]] = {"ncsnpp": NCSNpp, "ddpmpp": NCSNpp, "ddpm": DDPM,
                                      "dit": DiT}


# Precision name -> the networks' compute dtype (`dtype` field). Parameters, optimizer state
# and EMA stay float32 at every precision; see docs/precision.md.
PRECISIONS: dict[str, jnp.dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def with_precision(model: nn.Module, precision: str) -> nn.Module:
  """The network `model` computing in `precision` ('float32' | 'bfloat16').

  Only the compute dtype changes (`model.clone(dtype=...)`): the variables are the same tree
  of float32 arrays at every precision, so one checkpoint serves all of them, and the output
  is float32.

  Raises:
    ValueError: an unknown precision, or a network without a `dtype` field (only 'float32'
      is then valid).
  """
  check_choice("precision", precision, PRECISIONS)
  dtype = PRECISIONS[precision]
  if not hasattr(model, "dtype"):
    if precision == "float32":
      return model
    raise ValueError(f"{type(model).__name__} has no compute dtype field; precision "
                     f"{precision!r} needs a network with one (NCSNpp, DDPM)")
  if model.dtype == dtype:
    return model
  return model.clone(dtype=dtype)


def init_network(key: jax.Array, network: nn.Module, image_shape: tuple[int, ...]
                 ) -> Variables:
  """Initializes `network` for a batch of one image of shape `image_shape` `(H, W, C)`.

  Usable under `jax.eval_shape` to get shapes (e.g. to count parameters) without memory.

  Args:
    key: PRNG key for the parameters (and the frozen Fourier features).
    network: the network.
    image_shape: `(H, W, C)`.

  Returns:
    The variables: `{'params': ...}` plus, for Fourier embeddings, `{'constants': ...}`
    (frozen arrays that belong with the model but are not trained). Pass the whole dict to
    `network.apply`; give only `variables['params']` to the optimizer.
  """
  x = jnp.zeros((1, *image_shape), jnp.float32)
  labels = jnp.ones((1,), jnp.float32)  # positive: Fourier features embed log(label)
  params_key, dropout_key = jax.random.split(key)
  return dict(network.init({"params": params_key, "dropout": dropout_key}, x, labels,
                           train=False))


def count_params(variables: Variables) -> int:
  """Number of scalars in all collections of `variables` (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(variables))
