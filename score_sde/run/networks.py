"""The config edge of the networks: `config.model` -> a network of `models.MODELS`, its image
shape and its initial variables.

Each network class has one function here that reads the config fields it takes, so a new
network is one entry in `models.MODELS` and one in `NETWORK_FIELDS`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from score_sde import models
from score_sde.checks import check_choice
from score_sde.models.ddpm import DDPM
from score_sde.models.dit import DiT, dit_size
from score_sde.models.ncsnpp import NCSNpp
from score_sde.run import latent


def _unet_fields(config: ml_collections.ConfigDict) -> dict:
  """The fields every U-Net here takes (`DDPM`'s and `NCSNpp`'s common part).

  Raises:
    ValueError: a DiT-only field changed from its default.
  """
  m = config.model
  check_family_fields(config)
  return dict(
      nf=int(m.nf), ch_mult=tuple(int(c) for c in m.ch_mult),
      num_res_blocks=int(m.num_res_blocks),
      attn_resolutions=tuple(int(r) for r in m.attn_resolutions),
      dropout=float(m.dropout), resamp_with_conv=bool(m.resamp_with_conv),
      conditional=bool(m.conditional), scale_by_sigma=bool(m.scale_by_sigma),
      centered=bool(config.data.centered), sigma_min=float(m.sigma_min),
      sigma_max=float(m.sigma_max), num_scales=int(m.num_scales),
      num_classes=int(m.get("num_classes", 0)))


def _ncsnpp_fields(config: ml_collections.ConfigDict) -> dict:
  """NCSN++ / DDPM++: the U-Net fields and every NCSN++ option of `config.model`."""
  m = config.model
  if m.embedding_type == "fourier" and not config.training.continuous:
    raise ValueError("embedding_type='fourier' embeds log sigma and needs continuous "
                     "training (training.continuous=True); use 'positional' for discrete")
  return dict(
      **_unet_fields(config), fir=bool(m.fir), fir_kernel=tuple(int(k) for k in m.fir_kernel),
      skip_rescale=bool(m.skip_rescale), resblock_type=m.resblock_type.lower(),
      progressive=m.progressive.lower(), progressive_input=m.progressive_input.lower(),
      progressive_combine=m.progressive_combine.lower(), init_scale=float(m.init_scale),
      embedding_type=m.embedding_type.lower(), fourier_scale=float(m.fourier_scale))


# The fields of `config.model` only one network family reads, with their `configs/default.py`
# values: a DiT config must leave the U-Net's at these, a U-Net config the DiT's (a change
# would be silently ignored otherwise). tests/test_dit.py checks them against default.py.
UNET_ONLY_DEFAULTS: dict[str, Any] = {
    "nf": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 4, "attn_resolutions": (16,),
    "dropout": 0.1, "resamp_with_conv": True, "conditional": True, "fir": False,
    "fir_kernel": (1, 3, 3, 1), "skip_rescale": True, "resblock_type": "biggan",
    "progressive": "none", "progressive_input": "none", "progressive_combine": "sum",
    "init_scale": 0.0, "embedding_type": "fourier", "fourier_scale": 16.0}
DIT_SHAPE_DEFAULTS: dict[str, Any] = {"patch_size": 2, "hidden_size": 384, "depth": 12,
                                      "num_heads": 6}
DIT_ONLY_DEFAULTS: dict[str, Any] = {
    "dit_size": None, **DIT_SHAPE_DEFAULTS, "mlp_ratio": 4.0, "class_dropout_prob": 0.1,
    "learn_sigma": False, "attention_implementation": None}


def _same(value, default) -> bool:
  if isinstance(default, tuple):
    return tuple(value) == default
  return value == default


def _changed(m: ml_collections.ConfigDict, defaults: dict[str, Any]) -> list[str]:
  """`'field=value'` for each field of `defaults` that `m` has with another value."""
  return [f"{k}={m[k]!r}" for k, d in defaults.items()
          if k in m and m[k] is not None and not _same(m[k], d)]


def check_family_fields(config: ml_collections.ConfigDict) -> None:
  """A DiT config with a U-Net-only field changed from its default, or a U-Net config with a
  DiT-only one, is an error (the network would ignore it).

  Raises:
    ValueError: naming the fields, their values and the network.
  """
  m = config.model
  is_dit = models.MODELS.get(m.name) is DiT
  family, defaults = ("U-Net", UNET_ONLY_DEFAULTS) if is_dit else ("DiT", DIT_ONLY_DEFAULTS)
  changed = _changed(m, defaults)
  if changed:
    names = [c.split("=", 1)[0] for c in changed]
    raise ValueError(f"config.model.name={m.name!r} does not read the {family}-only field(s) "
                     f"{', '.join(changed)}; leave them at their defaults ("
                     f"{', '.join(f'{k}={defaults[k]!r}' for k in names)})")


def as_dit(config: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose network is the DiT of `size` (a `DIT_SIZES` name such as
  'S/2'): the same data, process and training, its U-Net-only fields back at their defaults
  (a DiT reads none of them; `check_family_fields`) and the DiT's shape fields unset.

  Raises:
    ValueError: an unknown `size`.
  """
  dit_size(size)  # an unknown size: the error names the valid ones
  out = ml_collections.ConfigDict(config.to_dict())
  for name, default in {**UNET_ONLY_DEFAULTS, **DIT_SHAPE_DEFAULTS}.items():
    if name in out.model:
      out.model[name] = default
  out.model.name, out.model.dit_size = "dit", size
  return out


def _dit_fields(config: ml_collections.ConfigDict) -> dict:
  """DiT from `config.model`: `dit_size` (a `DIT_SIZES` name such as 'XL/2') if set, else
  `patch_size`, `hidden_size`, `depth`, `num_heads`; and `mlp_ratio` (4.0),
  `class_dropout_prob` (0.1), `learn_sigma` (False), `num_classes`,
  `attention_implementation` (None). Checks the image size
  against the patch size here, before anything is compiled.

  Raises:
    ValueError: an unknown `dit_size`, a `dit_size` with shape fields changed too, a
      U-Net-only field changed from its default, or fields the DiT rejects (see `DiT`).
  """
  m = config.model
  check_family_fields(config)
  if m.get("dit_size", None):
    shape = dit_size(m.dit_size)
    clash = [f"{k}={m[k]!r}" for k, d in DIT_SHAPE_DEFAULTS.items()
             if k in m and m[k] != d and m[k] != shape[k]]
    if clash:
      raise ValueError(f"config.model.dit_size={m.dit_size!r} fixes {shape}, but "
                       f"{', '.join(clash)} is set too; unset dit_size (--config.model."
                       "dit_size=None) to give the shape field by field")
  else:
    shape = dict(patch_size=int(m.patch_size), hidden_size=int(m.hidden_size),
                 depth=int(m.depth), num_heads=int(m.num_heads))
  fields = dict(**shape, mlp_ratio=float(m.get("mlp_ratio", 4.0)),
                class_dropout_prob=float(m.get("class_dropout_prob", 0.1)),
                num_classes=int(m.get("num_classes", 0)),
                learn_sigma=bool(m.get("learn_sigma", False)),
                attention_implementation=m.get("attention_implementation", None) or None)
  height, width, _ = image_shape(config)
  DiT(**fields).grid(height, width)
  return fields


# network class -> the function that reads its fields from a config. DDPM takes only the
# common U-Net fields: it fixes the NCSN++ options itself.
NETWORK_FIELDS: dict[type[nn.Module], Callable[[ml_collections.ConfigDict], dict]] = {
    NCSNpp: _ncsnpp_fields, DDPM: _unet_fields, DiT: _dit_fields}


def get_model(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the network named by `config.model.name` (`models.MODELS`) from `config.model` /
  `config.data`, at float32 (`models.with_precision` gives other precisions).

  Raises:
    ValueError: unknown model name or option, or an option combination the networks do not
      support (Fourier embeddings need continuous labels, attention_type must be 'ddpm',
      conv_size 3).
  """
  m = config.model
  check_choice("model", m.name, models.MODELS)
  check_choice("attention_type", m.get("attention_type", "ddpm"), ("ddpm",))
  if m.get("conv_size", 3) != 3:
    raise ValueError(f"Unsupported conv_size {m.conv_size!r}; valid: (3,)")
  cls = models.MODELS[m.name]
  return cls(**NETWORK_FIELDS[cls](config))


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """`(H, W, C)` of the network's input: the config's images, or with `config.data.latent`
  their latents `(H / f, W / f, L)` (read off the autoencoder's config file)."""
  return latent.model_shape(config)


def init_model(key: jax.Array, config: ml_collections.ConfigDict,
               model: nn.Module | None = None) -> models.Variables:
  """`models.init_network` of the config's network (built by `get_model` unless given) for
  the config's image shape; usable under `jax.eval_shape`."""
  model = get_model(config) if model is None else model
  return models.init_network(key, model, image_shape(config))


def describe(config: ml_collections.ConfigDict) -> dict:
  """What `--mode=describe` prints: the network's exact size and cost, nothing allocated.

  Returns:
    `{"model", "image_shape", "params", "flops_per_image"}`: `params` counts every variable
    of `init` (the `constants` too, e.g. DiT's pos_embed, as the reference counts it) under
    `jax.eval_shape`; `flops_per_image` is XLA's cost analysis of one forward pass of
    batch 1 at float32 (the network only, eval mode, class label 0 when conditional),
    lowered, neither compiled nor run. XLA counts a multiply-add as 2 flops (the DiT paper's
    Gflops count it as 1).

  Raises:
    ValueError: the config's network fields (see `get_model`).
  """
  model = get_model(config)
  shape = image_shape(config)
  abstract = jax.eval_shape(lambda k: init_model(k, config, model), jax.random.key(0))
  conditional = int(config.model.get("num_classes", 0)) > 0

  def forward(variables, x, t):
    labels = jnp.zeros((1,), jnp.int32) if conditional else None
    return model.apply(variables, x, t, train=False, class_labels=labels)

  lowered = jax.jit(forward).lower(abstract, jax.ShapeDtypeStruct((1, *shape), jnp.float32),
                                   jax.ShapeDtypeStruct((1,), jnp.float32))
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0]
  return {"model": str(config.model.name), "image_shape": list(shape),
          "params": models.count_params(abstract),
          "flops_per_image": int(cost["flops"])}
