"""The config edge of the models: config -> network, variables and score function.

`get_model` and the builders in `MODELS` are the only places that read `config.model`; the
networks take plain fields.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from score_sde import sde as sde_lib
from score_sde.models.ddpm import DDPM
from score_sde.models.dit import DiT
from score_sde.models.dit import dit_size
from score_sde.models.ncsnpp import NCSNpp

Variables = dict[str, Any]


def _unet_fields(config: ml_collections.ConfigDict) -> dict:
  """The fields every U-Net here takes (`DDPM`'s and `NCSNpp`'s common part)."""
  m = config.model
  return dict(
      nf=int(m.nf), ch_mult=tuple(int(c) for c in m.ch_mult),
      num_res_blocks=int(m.num_res_blocks),
      attn_resolutions=tuple(int(r) for r in m.attn_resolutions),
      dropout=float(m.dropout), resamp_with_conv=bool(m.resamp_with_conv),
      conditional=bool(m.conditional), scale_by_sigma=bool(m.scale_by_sigma),
      centered=bool(config.data.centered), sigma_min=float(m.sigma_min),
      sigma_max=float(m.sigma_max), num_scales=int(m.num_scales),
      num_classes=int(m.get("num_classes", 0)))


def _build_ncsnpp(config: ml_collections.ConfigDict) -> NCSNpp:
  """NCSN++ / DDPM++ with every option of `config.model`."""
  m = config.model
  if m.embedding_type == "fourier" and not config.training.continuous:
    raise ValueError("embedding_type='fourier' embeds log sigma and needs continuous "
                     "training (training.continuous=True); use 'positional' for discrete")
  return NCSNpp(
      **_unet_fields(config), fir=bool(m.fir), fir_kernel=tuple(int(k) for k in m.fir_kernel),
      skip_rescale=bool(m.skip_rescale), resblock_type=m.resblock_type.lower(),
      progressive=m.progressive.lower(), progressive_input=m.progressive_input.lower(),
      progressive_combine=m.progressive_combine.lower(), init_scale=float(m.init_scale),
      embedding_type=m.embedding_type.lower(), fourier_scale=float(m.fourier_scale))


def _build_ddpm(config: ml_collections.ConfigDict) -> DDPM:
  """The DDPM U-Net: the common U-Net fields; DDPM fixes the NCSN++ options itself."""
  return DDPM(**_unet_fields(config))


def _build_dit(config: ml_collections.ConfigDict) -> DiT:
  """DiT from `config.model`: `dit_size` (a `DIT_SIZES` name such as 'XL/2') if set, else
  `patch_size`, `hidden_size`, `depth`, `num_heads`; and `mlp_ratio` (4.0),
  `class_dropout_prob` (0.1), `learn_sigma` (False), `num_classes`. Checks the image size
  against the patch size here, before anything is compiled.

  Raises:
    ValueError: an unknown `dit_size`, or fields the DiT rejects (see `DiT`).
  """
  m = config.model
  if m.get("dit_size", None):
    shape = dit_size(m.dit_size)
  else:
    shape = dict(patch_size=int(m.patch_size), hidden_size=int(m.hidden_size),
                 depth=int(m.depth), num_heads=int(m.num_heads))
  net = DiT(**shape, mlp_ratio=float(m.get("mlp_ratio", 4.0)),
            class_dropout_prob=float(m.get("class_dropout_prob", 0.1)),
            num_classes=int(m.get("num_classes", 0)),
            learn_sigma=bool(m.get("learn_sigma", False)))
  net.grid(config.data.image_size, config.data.image_size)
  return net


# name -> builder(config) -> network. Each builder reads the config fields its network takes,
# so a new network is one builder here. 'ddpmpp' is NCSN++ with DDPM++ options (set by the
# config); the name is an alias.
MODELS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "ncsnpp": _build_ncsnpp, "ddpmpp": _build_ncsnpp, "ddpm": _build_ddpm,
    "dit": _build_dit}


def get_model(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the network named by `config.model.name` from `config.model` / `config.data`.

  Raises:
    ValueError: unknown model name or option, or an option combination the networks do not
      support (Fourier embeddings need continuous labels, attention_type must be 'ddpm',
      conv_size 3).
  """
  m = config.model
  if m.name not in MODELS:
    raise ValueError(f"Unknown model {m.name!r}; valid: {sorted(MODELS)}")
  if m.get("attention_type", "ddpm") != "ddpm":
    raise ValueError(f"Unknown attention_type {m.attention_type!r}; valid: ('ddpm',)")
  if m.get("conv_size", 3) != 3:
    raise ValueError(f"Unsupported conv_size {m.conv_size!r}; valid: (3,)")
  return MODELS[m.name](config)


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
  if precision not in PRECISIONS:
    raise ValueError(f"Unknown precision {precision!r}; valid: {sorted(PRECISIONS)}")
  dtype = PRECISIONS[precision]
  if not hasattr(model, "dtype"):
    if precision == "float32":
      return model
    raise ValueError(f"{type(model).__name__} has no compute dtype field; precision "
                     f"{precision!r} needs a network with one (NCSNpp, DDPM)")
  if model.dtype == dtype:
    return model
  return model.clone(dtype=dtype)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """`(H, W, C)` of the config's images."""
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


def init_model(key: jax.Array, config: ml_collections.ConfigDict,
               model: nn.Module | None = None) -> Variables:
  """Initializes the config's network for a batch of one image of the config's shape.

  Usable under `jax.eval_shape` to get shapes (e.g. to count parameters) without memory.

  Args:
    key: PRNG key for the parameters (and the frozen Fourier features).
    config: the experiment config.
    model: the network, if already built by `get_model(config)`.

  Returns:
    The variables: `{'params': ...}` plus, for Fourier embeddings, `{'constants': ...}`
    (frozen arrays that belong with the model but are not trained). Pass the whole dict to
    `model.apply`; give only `variables['params']` to the optimizer.
  """
  model = get_model(config) if model is None else model
  x = jnp.zeros((1, *image_shape(config)), jnp.float32)
  labels = jnp.ones((1,), jnp.float32)  # positive: Fourier features embed log(label)
  params_key, dropout_key = jax.random.split(key)
  return dict(model.init({"params": params_key, "dropout": dropout_key}, x, labels,
                         train=False))


def count_params(variables: Variables) -> int:
  """Number of scalars in all collections of `variables` (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(variables))


def get_score_fn(sde: sde_lib.SDE, model: nn.Module, variables: Variables, train: bool = False,
                 continuous: bool = True, rng: jax.Array | None = None,
                 class_labels: jax.Array | None = None
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Wraps a network into a score function by the SDE's parameterization.

  `labels = sde.noise_labels(t, continuous)`, `output = model.apply(variables,
  sde.network_input(x, t), labels)`, `score = sde.score_from_output(output, t, continuous,
  x)`: the one place where a network output becomes a score. `sde.parameterization` says
  what the network predicts ('auto': VP / sub-VP epsilon, score = -output / std; VE the
  score, divided by sigma inside the network when `scale_by_sigma`; or 'epsilon', 'x0',
  'v', 'score', 'edm', see `score_sde.parameterization`).

  Args:
    sde: the forward SDE.
    model: the network.
    variables: its variables (all collections).
    train: run in training mode (dropout on).
    continuous: continuous-time labels (vs. discrete step indices).
    rng: dropout key, used when `train=True`.
    class_labels: `[B]` class labels (num_classes = null label) for class-conditional nets.

  Returns:
    `score_fn(x [B, *D], t [B]) -> [B, *D]`.

  Raises:
    ValueError: a parameterization that needs continuous time with `continuous=False`.
  """
  sde.check_network(continuous)
  rngs = {"dropout": rng} if rng is not None else None

  def score_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    labels = sde.noise_labels(t, continuous)
    output = model.apply(variables, sde.network_input(x, t), labels, train=train,
                         class_labels=class_labels, rngs=rngs)
    return sde.score_from_output(output, t, continuous, x)

  return score_fn
