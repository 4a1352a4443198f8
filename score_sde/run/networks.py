"""The config edge of the networks: `config.model` -> a network of `models.MODELS`, its image
shape and its initial variables.

Each network class has one function here that reads the config fields it takes, so a new
network is one entry in `models.MODELS` and one in `NETWORK_FIELDS`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import ml_collections

from score_sde import models
from score_sde.models.ddpm import DDPM
from score_sde.models.dit import DiT, dit_size
from score_sde.models.ncsnpp import NCSNpp
from score_sde.checks import check_choice
from score_sde.run import latent


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


def _dit_fields(config: ml_collections.ConfigDict) -> dict:
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
  fields = dict(**shape, mlp_ratio=float(m.get("mlp_ratio", 4.0)),
                class_dropout_prob=float(m.get("class_dropout_prob", 0.1)),
                num_classes=int(m.get("num_classes", 0)),
                learn_sigma=bool(m.get("learn_sigma", False)))
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
