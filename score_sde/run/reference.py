"""Import and export of score_sde_pytorch checkpoints (yang-song/score_sde_pytorch).

The reference saves `{'optimizer', 'model', 'ema', 'step'}` with `torch.save`: `model` is the
state dict of a `DataParallel`-wrapped network (keys `module.sigmas`, `module.all_modules.<i>.
<layer>.<weight>`), `ema` holds `shadow_params`, one tensor per trainable parameter in
`model.parameters()` order. Its networks keep every layer in one flat `ModuleList`,
`all_modules`, appended in a fixed order while the constructor walks the U-Net. `layout(config)`
walks the same U-Net from this project's config and lists, in the reference's order, every
state-dict entry with its shape and the Flax variable it corresponds to; nothing is hard-coded
per network size, so the same walk serves the full-size CIFAR-10 configs and any other size of
the same architectures (NCSN++ / DDPM++ and the DDPM U-Net).

Weight layouts: torch convolutions are `[O, I, kh, kw]`, Flax `[kh, kw, I, O]`; torch
`Linear` is `[O, I]`, Flax `Dense` `[I, O]`; the reference's 1x1 convolutions (BigGAN skip,
`Combine`) are Flax `Dense` layers here; its `NIN` layers (attention q/k/v/out, DDPM skip)
are already `[I, O]`; GroupNorm `weight` is Flax's `scale`; the frozen Fourier `W` lives in
the `constants` collection.

    weights = import_state(config, torch_zip.load("checkpoint_8.pth"))
    step = import_checkpoint(config, "checkpoint_8.pth", workdir)      # -> orbax checkpoint
    export_checkpoint(config, workdir, "exported.pth")                 # and back

The EMA weights become the EMA parameters (used by sampling and evaluation), the model
weights the parameters, the step the step; the reference's Adam moments are not imported
(the optimizer state starts fresh), and an export writes an empty Adam state.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
import shutil
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from score_sde import models
from score_sde.checks import check_choice
from score_sde.io import checkpoints, dit_files, files, torch_zip
from score_sde.io import workdir as workdir_lib
from score_sde.io.checkpoints import CheckpointMismatchError
from score_sde.models import dit_weights
from score_sde.models.dit import DIT_SIZES, DiT
from score_sde.run import autoencoder as autoencoder_run
from score_sde.run import experiment, networks, programs

# The checkpoints score_sde_pytorch published (paths as in its README) -> the config file here
# and the `--config.<field>=<value>` overrides that give the same network, SDE and training
# set-up. The CIFAR-10 rows use this project's CIFAR-10 configs; the 256 px and 1024 px
# rows reuse `cifar10_ve.py` with the reference's model and image-size fields (set
# `data.dataset` to your copy of the data for evaluation; sampling needs none).
_LSUN_256 = {"data.image_size": 256, "model.num_scales": 2000, "model.dropout": 0.0,
             "model.ch_mult": (1, 1, 2, 2, 2, 2, 2), "model.num_res_blocks": 2,
             "model.progressive": "output_skip", "model.progressive_input": "input_skip",
             "model.progressive_combine": "sum"}
PUBLISHED: dict[str, tuple[str, dict[str, Any]]] = {
    "ve/cifar10_ncsnpp": ("configs/cifar10_ve.py", {
        "training.continuous": False, "training.weighting": "smld",
        "model.embedding_type": "positional"}),
    "ve/cifar10_ncsnpp_continuous": ("configs/cifar10_ve.py", {}),
    "ve/cifar10_ncsnpp_deep_continuous": ("configs/cifar10_ve_deep.py", {}),
    "vp/cifar10_ddpm": ("configs/cifar10_ddpm.py", {}),
    "vp/cifar10_ddpm_continuous": ("configs/cifar10_ddpm.py", {
        "training.continuous": True, "training.weighting": "sigma2",
        "sampling.predictor": "euler_maruyama"}),
    "vp/cifar10_ddpmpp": ("configs/cifar10_vp.py", {
        "training.continuous": False, "training.weighting": "ddpm",
        "sampling.predictor": "ancestral_sampling"}),
    "vp/cifar10_ddpmpp_continuous": ("configs/cifar10_vp.py", {}),
    "vp/cifar10_ddpmpp_deep_continuous": ("configs/cifar10_vp_deep.py", {}),
    "subvp/cifar10_ddpm_continuous": ("configs/cifar10_ddpm.py", {
        "training.sde": "subvpsde", "training.continuous": True,
        "training.weighting": "sigma2", "sampling.predictor": "euler_maruyama"}),
    "subvp/cifar10_ddpmpp_continuous": ("configs/cifar10_subvp.py", {}),
    "subvp/cifar10_ddpmpp_deep_continuous": ("configs/cifar10_vp_deep.py", {
        "training.sde": "subvpsde"}),
    "ve/bedroom_ncsnpp_continuous": ("configs/cifar10_ve.py", {
        **_LSUN_256, "model.sigma_max": 378.0}),
    "ve/church_ncsnpp_continuous": ("configs/cifar10_ve.py", {
        **_LSUN_256, "model.sigma_max": 380.0}),
    "ve/ffhq_256_ncsnpp_continuous": ("configs/cifar10_ve.py", {
        **_LSUN_256, "model.sigma_max": 348.0}),
    "ve/celebahq_256_ncsnpp_continuous": ("configs/cifar10_ve.py", {
        **_LSUN_256, "model.sigma_max": 348.0}),
    "ve/ffhq_1024_ncsnpp_continuous": ("configs/cifar10_ve.py", {
        "data.image_size": 1024, "model.sigma_max": 1348.0,
        "model.num_scales": 2000, "model.ema_rate": 0.9999, "model.dropout": 0.0,
        "model.nf": 16, "model.ch_mult": (1, 2, 4, 8, 16, 32, 32, 32),
        "model.num_res_blocks": 1, "model.progressive": "output_skip",
        "model.progressive_input": "input_skip", "model.progressive_combine": "sum",
        "training.reduce_mean": True}),
}

# How a torch array becomes the Flax one.
KINDS = ("same", "linear", "conv", "conv1x1")

# Config fields that shape the reference's state dict, by what a mismatch looks like.
STRUCTURE_FIELDS = ("model.name", "model.num_res_blocks", "model.ch_mult",
                    "model.attn_resolutions", "model.resblock_type", "model.progressive",
                    "model.progressive_input", "model.embedding_type", "model.fir",
                    "model.resamp_with_conv", "model.conditional")
SHAPE_FIELDS = ("model.nf", "model.ch_mult", "model.progressive_combine",
                "model.embedding_type", "data.num_channels", "model.num_scales")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One entry of the reference's state dict.

  Attributes:
    key: the state-dict key without the `module.` prefix (e.g. `all_modules.4.Conv_0.weight`).
    shape: its torch shape.
    trainable: a trainable parameter, so also in the EMA's `shadow_params` (False for the
      `sigmas` buffer and the frozen Fourier `W`).
    collection: the Flax collection (`params` or `constants`), or None where this project
      has no counterpart (the `sigmas` buffer; a time-embedding layer an unconditional
      reference network builds but never uses).
    path: the Flax variable's path inside `collection`.
    kind: the layout conversion, one of `KINDS`.
    dtype: the reference's dtype.
  """

  key: str
  shape: tuple[int, ...]
  trainable: bool = True
  collection: str | None = "params"
  path: tuple[str, ...] = ()
  kind: str = "same"
  dtype: str = "float32"


@dataclasses.dataclass
class ReferenceWeights:
  """A reference checkpoint in this project's terms: `params` / `ema_params` (Flax params
  trees), `constants` (the non-`params` variable collections) and the training `step`."""

  params: dict
  ema_params: dict
  constants: dict
  step: int


# --- layout conversions ----------------------------------------------------------------------


def to_flax(kind: str, array: np.ndarray) -> np.ndarray:
  """A torch-layout array as the Flax variable of conversion `kind`."""
  if kind == "conv":  # [O, I, kh, kw] -> [kh, kw, I, O]
    return np.transpose(array, (2, 3, 1, 0))
  if kind == "conv1x1":  # [O, I, 1, 1] -> Dense [I, O]
    return np.transpose(array[:, :, 0, 0])
  if kind == "linear":  # [O, I] -> [I, O]
    return np.transpose(array)
  return array


def to_torch(kind: str, array: np.ndarray) -> np.ndarray:
  """The inverse of `to_flax`."""
  if kind == "conv":
    return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
  if kind == "conv1x1":
    return np.ascontiguousarray(np.transpose(array)[:, :, None, None])
  if kind == "linear":
    return np.ascontiguousarray(np.transpose(array))
  return array


def flax_shape(entry: Entry) -> tuple[int, ...]:
  """The shape of the Flax variable of `entry`."""
  return to_flax(entry.kind, np.empty(entry.shape, np.int8)).shape


# --- the reference's module order ------------------------------------------------------------


class _Walk:
  """Collects entries while walking a U-Net in the reference's construction order.

  Alongside the reference's `all_modules.<i>` index it counts the names Flax gives the
  modules of a compact `__call__` (`<Class>_<n>`, numbered per class in creation order),
  including parameter-free ones that only take up a number.
  """

  def __init__(self):
    self.entries: list[Entry] = []
    self._index = 0
    self._flax_counts: collections.Counter = collections.Counter()

  def flax_name(self, cls: str) -> str:
    n = self._flax_counts[cls]
    self._flax_counts[cls] += 1
    return f"{cls}_{n}"

  def module(self) -> str:
    """The key prefix of the next entry of `all_modules`."""
    self._index += 1
    return f"all_modules.{self._index - 1}."

  # Leaf layers: `prefix` is the torch key prefix, `path` the Flax module path (None: none).
  def _weight_bias(self, prefix, path, shape, kind, weight="weight", bias="bias",
                   flax_weight="kernel"):
    collection = "params" if path is not None else None
    path = tuple(path or ())
    self.entries.append(Entry(prefix + weight, tuple(shape), collection=collection,
                              path=path + (flax_weight,), kind=kind))
    self.entries.append(Entry(prefix + bias, (shape[0] if kind != "same" else shape[-1],),
                              collection=collection, path=path + ("bias",)))

  def conv3x3(self, prefix, path, cin, cout):
    self._weight_bias(prefix, path, (cout, cin, 3, 3), "conv")

  def conv1x1(self, prefix, path, cin, cout):
    self._weight_bias(prefix, path, (cout, cin, 1, 1), "conv1x1")

  def linear(self, prefix, path, cin, cout):
    self._weight_bias(prefix, path, (cout, cin), "linear")

  def nin(self, prefix, path, cin, cout):
    self._weight_bias(prefix, path, (cin, cout), "same", weight="W", bias="b")

  def group_norm(self, prefix, path, channels):
    self._weight_bias(prefix, path, (channels,), "same", flax_weight="scale")

  # Entries of `all_modules`.
  def top_conv3x3(self, cin, cout):
    self.conv3x3(self.module(), (self.flax_name("Conv"),), cin, cout)

  def top_linear(self, cin, cout):
    self.linear(self.module(), (self.flax_name("Dense"),), cin, cout)

  def top_group_norm(self, channels):
    self.group_norm(self.module(), (self.flax_name("GroupNorm"),), channels)

  def fourier(self, size):
    self.entries.append(Entry(self.module() + "W", (size,), trainable=False,
                              collection=models.CONSTANTS,
                              path=(self.flax_name("GaussianFourierProjection"), "W")))

  def resnet(self, *, cin, cout, temb_dim, conditional, biggan, resample=False):
    """A residual block: reference `ResnetBlockBigGANpp` / `ResnetBlockDDPMpp` /
    `ResnetBlockDDPM`, Flax `layers.ResnetBlock` ('biggan' / 'ddpm')."""
    prefix, flax = self.module(), (self.flax_name("ResnetBlock"),)
    self.group_norm(prefix + "GroupNorm_0.", flax + ("GroupNorm_0",), cin)
    self.conv3x3(prefix + "Conv_0.", flax + ("Conv_0",), cin, cout)
    dense = 0
    if temb_dim:
      # The reference builds the embedding projection even when the network is
      # unconditional (it then never uses it); Flax creates it only when used.
      self.linear(prefix + "Dense_0.", flax + ("Dense_0",) if conditional else None,
                  temb_dim, cout)
      dense += int(conditional)
    self.group_norm(prefix + "GroupNorm_1.", flax + ("GroupNorm_1",), cout)
    self.conv3x3(prefix + "Conv_1.", flax + ("Conv_1",), cout, cout)
    if biggan and (cin != cout or resample):
      self.conv1x1(prefix + "Conv_2.", flax + (f"Dense_{dense}",), cin, cout)
    elif not biggan and cin != cout:
      self.nin(prefix + "NIN_0.", flax + (f"Dense_{dense}",), cin, cout)

  def attention(self, channels):
    prefix, flax = self.module(), (self.flax_name("AttnBlock"),)
    self.group_norm(prefix + "GroupNorm_0.", flax + ("GroupNorm_0",), channels)
    for i in range(4):  # q, k, v, output
      self.nin(prefix + f"NIN_{i}.", flax + (f"Dense_{i}",), channels, channels)

  def combine(self, cin, cout):
    self.conv1x1(self.module() + "Conv_0.", (self.flax_name("Combine"), "Dense_0"), cin, cout)

  def resample(self, cls, *, cin, cout, with_conv, fir, listed=True):
    """An `Upsample` / `Downsample`. `listed=False`: the reference keeps it outside
    `all_modules` (the parameter-free pyramid resamplers), Flax still numbers it."""
    flax = (self.flax_name(cls),)
    prefix = self.module() if listed else None
    if not with_conv:
      return
    if fir:  # StyleGAN2 fused conv: reference `Conv2d_0` ([O, I, k, k]), Flax `FIRConv_0`
      self.conv3x3(prefix + "Conv2d_0.", flax + ("FIRConv_0",), cin, cout)
    else:
      self.conv3x3(prefix + "Conv_0.", flax + ("Conv_0",), cin, cout)


def _ncsnpp(walk: _Walk, m: ml_collections.ConfigDict, channels: int, image_size: int) -> None:
  """Reference `models/ncsnpp.py` (`NCSNpp.__init__`), in its order."""
  nf, ch_mult = int(m.nf), tuple(int(c) for c in m.ch_mult)
  num_res_blocks, attn = int(m.num_res_blocks), {int(r) for r in m.attn_resolutions}
  fir, conditional = bool(m.fir), bool(m.conditional)
  biggan = m.resblock_type.lower() == "biggan"
  progressive, progressive_input = m.progressive.lower(), m.progressive_input.lower()
  levels = len(ch_mult)
  resolutions = [image_size // 2 ** i for i in range(levels)]
  resnet = dict(temb_dim=4 * nf, conditional=conditional, biggan=biggan)

  if m.embedding_type.lower() == "fourier":
    walk.fourier(nf)
    embed_dim = 2 * nf
  else:
    embed_dim = nf
  if conditional:
    walk.top_linear(embed_dim, 4 * nf)
    walk.top_linear(4 * nf, 4 * nf)

  walk.top_conv3x3(channels, nf)
  skips, cin, pyramid_ch = [nf], nf, channels
  for level in range(levels):
    for _ in range(num_res_blocks):
      walk.resnet(cin=cin, cout=nf * ch_mult[level], **resnet)
      cin = nf * ch_mult[level]
      if resolutions[level] in attn:
        walk.attention(cin)
      skips.append(cin)
    if level == levels - 1:
      continue
    if biggan:
      walk.resnet(cin=cin, cout=cin, resample=True, **resnet)
    else:
      walk.resample("Downsample", cin=cin, cout=cin, with_conv=bool(m.resamp_with_conv),
                    fir=fir)
    if progressive_input == "input_skip":
      walk.resample("Downsample", cin=pyramid_ch, cout=pyramid_ch, with_conv=False, fir=fir,
                    listed=False)
      walk.combine(pyramid_ch, cin)
      if m.progressive_combine.lower() == "cat":
        cin *= 2
    elif progressive_input == "residual":
      walk.resample("Downsample", cin=pyramid_ch, cout=cin, with_conv=True, fir=fir)
      pyramid_ch = cin
    skips.append(cin)

  cin = skips[-1]
  walk.resnet(cin=cin, cout=cin, **resnet)
  walk.attention(cin)
  walk.resnet(cin=cin, cout=cin, **resnet)

  for level in reversed(range(levels)):
    for _ in range(num_res_blocks + 1):
      walk.resnet(cin=cin + skips.pop(), cout=nf * ch_mult[level], **resnet)
      cin = nf * ch_mult[level]
    if resolutions[level] in attn:
      walk.attention(cin)
    if progressive == "output_skip":
      walk.top_group_norm(cin)
      walk.top_conv3x3(cin, channels)
      if level != levels - 1:
        walk.resample("Upsample", cin=channels, cout=channels, with_conv=False, fir=fir,
                      listed=False)
    elif progressive == "residual":
      if level == levels - 1:
        walk.top_group_norm(cin)
        walk.top_conv3x3(cin, cin)
      else:
        walk.resample("Upsample", cin=pyramid_ch, cout=cin, with_conv=True, fir=fir)
      pyramid_ch = cin
    if level != 0:
      if biggan:
        walk.resnet(cin=cin, cout=cin, resample=True, **resnet)
      else:
        walk.resample("Upsample", cin=cin, cout=cin, with_conv=bool(m.resamp_with_conv),
                      fir=fir)
  assert not skips
  if progressive != "output_skip":
    walk.top_group_norm(cin)
    walk.top_conv3x3(cin, channels)


def _ddpm(walk: _Walk, m: ml_collections.ConfigDict, channels: int, image_size: int) -> None:
  """Reference `models/ddpm.py` (`DDPM.__init__`), in its order."""
  if not m.conditional:
    raise ValueError("config.model.conditional=False: the reference DDPM network cannot be "
                     "built unconditional, so it has no checkpoints of that kind")
  nf, ch_mult = int(m.nf), tuple(int(c) for c in m.ch_mult)
  num_res_blocks, attn = int(m.num_res_blocks), {int(r) for r in m.attn_resolutions}
  levels = len(ch_mult)
  resolutions = [image_size // 2 ** i for i in range(levels)]
  resnet = dict(temb_dim=4 * nf, conditional=True, biggan=False)
  with_conv = bool(m.resamp_with_conv)

  walk.top_linear(nf, 4 * nf)
  walk.top_linear(4 * nf, 4 * nf)
  walk.top_conv3x3(channels, nf)
  skips, cin = [nf], nf
  for level in range(levels):
    for _ in range(num_res_blocks):
      walk.resnet(cin=cin, cout=nf * ch_mult[level], **resnet)
      cin = nf * ch_mult[level]
      if resolutions[level] in attn:
        walk.attention(cin)
      skips.append(cin)
    if level != levels - 1:
      walk.resample("Downsample", cin=cin, cout=cin, with_conv=with_conv, fir=False)
      skips.append(cin)
  walk.resnet(cin=cin, cout=cin, **resnet)
  walk.attention(cin)
  walk.resnet(cin=cin, cout=cin, **resnet)
  for level in reversed(range(levels)):
    for _ in range(num_res_blocks + 1):
      walk.resnet(cin=cin + skips.pop(), cout=nf * ch_mult[level], **resnet)
      cin = nf * ch_mult[level]
    if resolutions[level] in attn:
      walk.attention(cin)
    if level != 0:
      walk.resample("Upsample", cin=cin, cout=cin, with_conv=with_conv, fir=False)
  assert not skips
  walk.top_group_norm(cin)
  walk.top_conv3x3(cin, channels)


# Config model name -> the reference constructor's walk.
_WALKS = {"ncsnpp": _ncsnpp, "ddpmpp": _ncsnpp, "ddpm": _ddpm}


def layout(config: ml_collections.ConfigDict) -> list[Entry]:
  """The reference network's state dict for `config`, in the reference's order.

  The first entry is the `sigmas` buffer (`[num_scales]`, float64); then every parameter of
  `all_modules` in order. `model.parameters()` (and so the EMA's `shadow_params`, which keep
  only the trainable ones) follow the same order.

  Raises:
    ValueError: a model the reference does not have (`config.model.name`, class-conditional
      networks) or one it cannot build.
  """
  m = config.model
  if m.name not in _WALKS:
    raise ValueError(f"No reference checkpoint layout for config.model.name={m.name!r}; "
                     f"valid: {sorted(_WALKS)}")
  if int(m.get("num_classes", 0)) > 0:
    raise ValueError(f"config.model.num_classes={m.num_classes}: the reference networks are "
                     "unconditional (no class embedding); use num_classes=0")
  walk = _Walk()
  walk.entries.append(Entry("sigmas", (int(m.num_scales),), trainable=False, collection=None,
                            dtype="float64"))
  _WALKS[m.name](walk, m, int(config.data.num_channels), int(config.data.image_size))
  return walk.entries


def reference_sigmas(config: ml_collections.ConfigDict) -> np.ndarray:
  """The reference's `sigmas` buffer: `[num_scales]` geometric from sigma_max to sigma_min."""
  m = config.model
  return np.exp(np.linspace(np.log(float(m.sigma_max)), np.log(float(m.sigma_min)),
                            int(m.num_scales)))


def _get(tree: dict, path: Iterable[str]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def check_layout(config: ml_collections.ConfigDict, entries: list[Entry] | None = None
                 ) -> None:
  """Checks that `layout(config)` covers this project's network for `config` exactly: every
  variable once, with the converted shape (shapes from `jax.eval_shape`, no memory).

  Raises:
    CheckpointMismatchError: a Flax variable the layout misses, names twice or shapes
      differently (a disagreement between the two architectures, not a user error).
  """
  entries = layout(config) if entries is None else entries
  variables = jax.eval_shape(lambda k: networks.init_model(k, config), jax.random.PRNGKey(0))
  flat = {(collection, *(k.key for k in path)): leaf for collection, tree in variables.items()
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  seen = set()
  for e in entries:
    if e.collection is None:
      continue
    where = (e.collection, *e.path)
    if where not in flat:
      raise CheckpointMismatchError(f"reference entry {e.key} maps to {'/'.join(where)}, "
                                    "which this project's network does not have")
    if where in seen:
      raise CheckpointMismatchError(f"{'/'.join(where)} is mapped twice (again by {e.key})")
    seen.add(where)
    if tuple(flat[where].shape) != flax_shape(e):
      raise CheckpointMismatchError(
          f"reference entry {e.key} {e.shape} becomes {flax_shape(e)}, but "
          f"{'/'.join(where)} has shape {tuple(flat[where].shape)}")
  missing = sorted("/".join(k) for k in set(flat) - seen)
  if missing:
    raise CheckpointMismatchError(f"{len(missing)} variables of this project's network have no "
                                  f"reference counterpart, e.g. {missing[:3]}")


# --- reading ---------------------------------------------------------------------------------


def _field(config: ml_collections.ConfigDict, name: str) -> Any:
  section, field = name.split(".")
  value = config[section].get(field)
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _variant(config: ml_collections.ConfigDict, changes: Iterable[tuple[str, Any]]
             ) -> ml_collections.ConfigDict:
  config = copy.deepcopy(config)
  config.unlock()
  for name, value in changes:
    section, field = name.split(".")
    config[section][field] = value
  return config


_CH_MULTS = ((1, 2, 2, 2), (1, 2, 2), (1, 2), (1, 2, 2, 2, 2), (1, 2, 2, 2, 2, 2),
             (1, 1, 2, 2, 2, 2, 2), (1, 2, 2, 2, 2, 2, 2), (1, 1, 2, 2, 4, 4), (1, 2, 3, 4),
             (1, 2, 4, 8), (1, 2, 4, 8, 16, 32, 32, 32))
_CHOICES = {"model.name": ("ncsnpp", "ddpm"), "model.resblock_type": ("biggan", "ddpm"),
            "model.progressive": ("none", "output_skip", "residual"),
            "model.progressive_input": ("none", "input_skip", "residual"),
            "model.progressive_combine": ("sum", "cat"),
            "model.embedding_type": ("fourier", "positional"), "model.fir": (True, False),
            "model.resamp_with_conv": (True, False), "model.conditional": (True, False),
            "data.num_channels": (1, 3)}


def _inferred_nf(found: dict[str, tuple]) -> int | None:
  """The output channels of the checkpoint's first 3x3 convolution (the input conv: nf)."""
  return next((shape[0] for key, shape in found.items() if key.endswith(".weight")
               and len(shape) == 4 and shape[2:] == (3, 3)), None)


def _single_changes(config: ml_collections.ConfigDict, found: dict[str, tuple]) -> list:
  """One-field changes of `config` worth trying when a checkpoint does not match."""
  m = config.model
  nfs = {int(m.nf) // 2, int(m.nf) * 2, 32, 64, 96, 128, 160, 192, 256, _inferred_nf(found)}
  out = [("model.nf", v) for v in sorted(v for v in nfs if v)]
  out += [("model.num_res_blocks", v) for v in range(1, 13)]
  out += [("model.ch_mult", v) for v in _CH_MULTS]
  size = int(config.data.image_size)
  attns = [(), (16,), (8,), (16, 8), (32, 16), (size // 2,), (size // 4,), (size // 8,)]
  out += [("model.attn_resolutions", v) for v in dict.fromkeys(attns)]
  for name, values in _CHOICES.items():
    out += [(name, v) for v in values]
  if found.get("sigmas"):
    out.append(("model.num_scales", found["sigmas"][0]))
  return [(name, v) for name, v in out if _field(config, name) != v]


def _size_changes(config: ml_collections.ConfigDict, found: dict[str, tuple]):
  """Joint changes of the size fields: the checkpoint's nf with every num_res_blocks and
  ch_mult tried (a network of another size usually differs in several)."""
  nf = _inferred_nf(found) or int(config.model.nf)
  for num_res_blocks in range(1, 13):
    for ch_mult in (_field(config, "model.ch_mult"), *_CH_MULTS):
      changes = [("model.nf", nf), ("model.num_res_blocks", num_res_blocks),
                 ("model.ch_mult", ch_mult)]
      changes = [(n, v) for n, v in changes if _field(config, n) != v]
      if len(changes) > 1:
        yield changes


def _layout_shapes(config) -> dict[str, tuple] | None:
  try:
    return {e.key: e.shape for e in layout(config)}
  except (ValueError, KeyError, AssertionError, ZeroDivisionError):
    return None


def _fixes(config: ml_collections.ConfigDict, found: dict[str, tuple], limit: int = 3
           ) -> list[list[tuple[str, Any]]]:
  """Config changes (one field, else the size fields jointly) that make `layout(config)`
  equal the checkpoint's keys and shapes."""
  fixes = []
  for changes in ([[c] for c in _single_changes(config, found)],
                  _size_changes(config, found)):
    for change in changes:
      if _layout_shapes(_variant(config, change)) == found:
        fixes.append(change)
        if len(fixes) >= limit:
          return fixes
    if fixes:
      return fixes
  return fixes


def _mismatch(config: ml_collections.ConfigDict, expected: list[Entry],
              found: dict[str, tuple], where: str) -> CheckpointMismatchError:
  """The error for a state dict `found` (key -> shape) that differs from `expected`: names
  the first differing key, both shapes, and the config fields that most likely differ."""
  keys = list(found)
  first = None
  for i, e in enumerate(expected):
    if e.key not in found:
      extra = next((k for k in keys if k not in {x.key for x in expected}), None)
      first = (f"the config's network has {e.key} {e.shape} (entry {i}), the checkpoint "
               "does not" + (f"; its first unexpected key is {extra} {found[extra]}"
                             if extra else ""))
      fields = STRUCTURE_FIELDS
      break
    if tuple(found[e.key]) != e.shape:
      first = (f"{e.key} has shape {tuple(found[e.key])} in the checkpoint, but the config's "
               f"network has {e.shape}")
      fields = ("model.num_scales",) if e.key == "sigmas" else SHAPE_FIELDS
      break
  if first is None:
    extra = [k for k in keys if k not in {e.key for e in expected}]
    first = (f"the checkpoint has {len(extra)} entries the config's network lacks, first "
             f"{extra[0]} {found[extra[0]]}")
    fields = STRUCTURE_FIELDS
  matches = [", ".join(f"config.{name}={value!r}" for name, value in fix)
             for fix in _fixes(config, found)]
  current = ", ".join(f"{name}={_field(config, name)!r}" for name in dict.fromkeys(fields))
  hint = (f"the checkpoint matches the config with {' or '.join(matches)}" if matches else
          f"fields that most likely differ (current values): {current}")
  return CheckpointMismatchError(f"{where}: the checkpoint does not fit the config: {first}. "
                                 f"{hint}. Pass --config.<field>=<value> to match it.")


def _state_dict(checkpoint: Any, where: str) -> tuple[dict, list | None, int]:
  """`(model state dict without 'module.', EMA shadow params or None, step)`."""
  if not isinstance(checkpoint, dict):
    raise CheckpointMismatchError(f"{where}: expected a dict, found "
                                  f"{type(checkpoint).__name__}")
  if "model" not in checkpoint:  # a bare state dict
    model, shadow, step = checkpoint, None, 0
  else:
    model, step = checkpoint["model"], checkpoint.get("step", 0)
    ema = checkpoint.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
  if not isinstance(model, dict) or not all(isinstance(v, np.ndarray) for v in model.values()):
    raise CheckpointMismatchError(f"{where}: 'model' is not a state dict of tensors")
  if model and all(k.startswith("module.") for k in model):
    model = {k[len("module."):]: v for k, v in model.items()}
  if isinstance(step, np.ndarray):
    step = step.item()
  if not isinstance(step, (int, float)):
    raise CheckpointMismatchError(f"{where}: 'step' is {type(step).__name__}, not a number")
  return model, shadow, int(step)


def import_state(config: ml_collections.ConfigDict, checkpoint: Any, *, where: str = "checkpoint"
                 ) -> ReferenceWeights:
  """Maps a loaded reference checkpoint onto this project's variables for `config`.

  Args:
    config: the experiment config whose network the checkpoint is for.
    checkpoint: `torch_zip.load(path)`: `{'model', 'ema', 'step', ...}`, or a bare state dict
      (then the EMA parameters are the model's, and the step 0).
    where: how to name the checkpoint in errors (its path).

  Returns:
    The weights: params from `model`, EMA params from `ema.shadow_params`, the frozen
    Fourier features from `model`, and the step.

  Raises:
    CheckpointMismatchError: keys or shapes that do not fit the config (the message names
      the first differing key, both shapes and the config fields that most likely differ),
      or EMA shadow parameters that do not fit the model's.
  """
  entries = layout(config)
  check_layout(config, entries)
  model, shadow, step = _state_dict(checkpoint, where)
  found = {k: tuple(v.shape) for k, v in model.items()}
  if found != {e.key: e.shape for e in entries}:
    raise _mismatch(config, entries, found, where)
  trainable = [e for e in entries if e.trainable]
  if shadow is None:
    logging.warning("%s has no EMA weights: the EMA parameters start as the model's", where)
    shadow = [model[e.key] for e in trainable]
  if not isinstance(shadow, (list, tuple)):
    raise CheckpointMismatchError(f"{where}: ema.shadow_params is "
                                  f"{type(shadow).__name__}, not a list of tensors")
  if len(shadow) != len(trainable):
    raise CheckpointMismatchError(
        f"{where}: ema.shadow_params has {len(shadow)} entries, but the model has "
        f"{len(trainable)} trainable parameters")
  ema = {}
  for e, array in zip(trainable, shadow):
    if not isinstance(array, np.ndarray) or tuple(array.shape) != e.shape:
      raise CheckpointMismatchError(
          f"{where}: ema.shadow_params entry for {e.key} has shape "
          f"{getattr(array, 'shape', type(array).__name__)}, the model's has {e.shape}")
    ema[e.key] = array
  _check_finite(model, where, "model")
  _check_finite(ema, where, "ema.shadow_params")
  sigmas = model["sigmas"]
  if not np.allclose(sigmas, reference_sigmas(config), rtol=1e-6):
    m = config.model
    message = (f"{where}: its sigmas buffer ({sigmas[0]:.6g} .. {sigmas[-1]:.6g}) is not the "
               f"config's geometric sequence from config.model.sigma_max={m.sigma_max} to "
               f"sigma_min={m.sigma_min}")
    # The networks divide by these sigmas with scale_by_sigma and discrete labels.
    if m.scale_by_sigma and (m.name == "ddpm" or m.embedding_type != "fourier"):
      raise CheckpointMismatchError(message)
    logging.warning("%s (unused by this network)", message)
  variables: dict[str, dict] = {}
  ema_params: dict = {}
  for e in entries:
    if e.collection is None:
      continue
    _set(variables.setdefault(e.collection, {}), e.path,
         to_flax(e.kind, model[e.key]).astype(np.float32))
    if e.collection == "params":
      _set(ema_params, e.path, to_flax(e.kind, ema[e.key]).astype(np.float32))
  params = variables.pop("params")
  return ReferenceWeights(params=params, ema_params=ema_params, constants=variables, step=step)


# --- writing ---------------------------------------------------------------------------------


def export_state(config: ml_collections.ConfigDict, params: dict, ema_params: dict,
                 constants: dict, step: int) -> dict:
  """This project's weights as a reference checkpoint object (for `torch_zip.save`).

  Returns:
    `{'optimizer', 'model', 'ema', 'step'}` as the reference's `save_checkpoint` writes it:
    `model` an OrderedDict with `module.` keys in the reference's order (plus its `sigmas`
    buffer), `ema` with `decay` = `config.model.ema_rate`, `num_updates` = step and the
    `shadow_params` from `ema_params`, and an Adam state dict with empty moments (this
    project's optax state is not converted) and the config's hyper-parameters.
  """
  entries = layout(config)
  check_layout(config, entries)
  variables = {"params": params, **constants}
  model, shadow = collections.OrderedDict(), []
  for e in entries:
    if e.key == "sigmas":
      value = reference_sigmas(config)
    elif e.collection is None:  # built but unused by the reference: zeros
      value = np.zeros(e.shape, np.float32)
    else:
      value = to_torch(e.kind, np.asarray(_get(variables[e.collection], e.path), np.float32))
    model["module." + e.key] = value
    if e.trainable:
      ema_value = value
      if e.collection == "params":
        ema_value = to_torch(e.kind, np.asarray(_get(ema_params, e.path), np.float32))
      shadow.append(ema_value)
  o = config.optim
  n_params = sum(1 for e in entries if e.key != "sigmas")
  optimizer = {"state": {}, "param_groups": [{
      "lr": float(o.lr), "betas": (float(o.beta1), 0.999), "eps": float(o.eps),
      "weight_decay": float(o.get("weight_decay", 0.0)), "amsgrad": False,
      "params": list(range(n_params))}]}
  return {"optimizer": optimizer, "model": model,
          "ema": {"decay": float(config.model.ema_rate), "num_updates": int(step),
                  "shadow_params": shadow},
          "step": int(step)}


# --- workdirs --------------------------------------------------------------------------------


def import_checkpoint(config: ml_collections.ConfigDict, checkpoint_path: str | os.PathLike,
                      workdir: str | os.PathLike, *, overwrite: bool = False) -> int:
  """Writes a reference checkpoint file as an orbax checkpoint of `workdir`.

  After this, `programs.load_run(workdir)` (and `--mode=sample` / `eval`)
  use it as a trained run's checkpoint: EMA weights -> `ema_params`, model weights ->
  `params`, step -> step. The optimizer state is freshly initialized (the reference's Adam
  moments are not converted). Also writes `workdir/config.json` and
  `workdir/imported_from.json`.

  Nothing is lost, whatever happens: the workdir's lock is held throughout; the new
  checkpoint and files are first written completely into `workdir/.import-<pid>/`; only
  then are they moved into place (`workdir_lib.finish_import`: the new `checkpoints/` and
  the old are exchanged atomically), the old `checkpoints/` moved to
  `checkpoints_set_aside/checkpoints.before_import[.k]` and an old, different
  `config.json` kept as `config.<k>.json` (never deleted). An interrupt before that leaves
  the old state; one during it is finished by the next command that takes the lock.

  Args:
    config: the experiment config matching the checkpoint's network.
    checkpoint_path: the reference `.pth` file.
    workdir: the run directory to write.
    overwrite: replace (set aside) existing checkpoints and a different `config.json` of
      `workdir` (otherwise refuse).

  Returns:
    The imported step.

  Raises:
    FileNotFoundError: no such checkpoint file.
    FileExistsError: `workdir` already has checkpoints, or another run's `config.json` /
      `imported_from.json`, and `overwrite` is False.
    torch_zip.CheckpointFormatError: not a torch checkpoint, or unsafe pickle contents.
    CheckpointMismatchError: the checkpoint does not fit the config's network, or holds
      non-finite weights.
    workdir_lib.WorkdirBusyError: another process writes to `workdir`.
  """
  path, workdir = os.fspath(checkpoint_path), os.fspath(workdir)
  plain = _check_import_target(config, path, workdir, overwrite)
  weights = import_state(config, torch_zip.load(path), where=path)
  _write_import(config, plain, workdir, weights.step, weights.params, weights.ema_params,
                weights.constants, {"checkpoint": os.path.abspath(path),
                                    "step": weights.step, "optimizer_state": "re-initialized"})
  logging.info("Imported %s (step %d) into %s; the optimizer state is re-initialized (the "
               "reference's Adam moments are not converted)", path, weights.step, workdir)
  return weights.step


def _check_import_target(config: ml_collections.ConfigDict, path: str, workdir: str,
                         overwrite: bool) -> dict:
  """Checks before an import reads anything heavy: the file exists, `workdir` is usable,
  its `checkpoints/` does not leave it, and (unless `overwrite`) it holds neither
  checkpoints nor another run's `config.json`. Returns the config as plain data."""
  workdir_lib.check_workdir(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--checkpoint={path}: no such file")
  ckpt_dir = checkpoints.checkpoint_dir(workdir)
  workdir_lib.check_inside(workdir, ckpt_dir, "its checkpoints")
  plain = experiment.config_to_plain(config)
  if not overwrite:
    if checkpoints.has_checkpoints(workdir):
      raise FileExistsError(f"{ckpt_dir} already holds checkpoints "
                            f"({sorted(os.listdir(ckpt_dir))}); pass overwrite=True "
                            "(--overwrite) to set them aside and import, or choose another "
                            "workdir")
    saved = workdir_lib.load_config(workdir)
    if saved is not None and saved != plain:
      raise FileExistsError(f"{workdir_lib.config_path(workdir)} holds another run's config; "
                            "pass overwrite=True (--overwrite) to import anyway (it is kept as "
                            "config.<k>.json), or choose another workdir")
  return plain


def _write_import(config: ml_collections.ConfigDict, plain: dict, workdir: str, step: int,
                  params, ema_params, constants, provenance: dict) -> None:
  """Puts imported weights in place as checkpoint `step` of `workdir` (fresh optimizer
  state), with `config.json` (`plain`) and `imported_from.json` (`provenance`), losing
  nothing (see `import_checkpoint`): under the workdir's lock, staged completely in
  `workdir/.import-<pid>/`, then moved into place by `workdir_lib.finish_import`."""
  to_jax = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)  # noqa: E731
  params = to_jax(params)
  state = programs.TrainState(
      step=jnp.asarray(step, jnp.int32), params=params,
      opt_state=experiment.make_optimizer(config).init(params),
      ema_params=to_jax(ema_params), constants=to_jax(constants))
  with workdir_lib.locked(workdir, "import", enabled=jax.process_index() == 0):
    for name in os.listdir(workdir):  # staging folders of interrupted imports (incomplete)
      if name.startswith(".import-") and os.path.isdir(os.path.join(workdir, name)):
        shutil.rmtree(os.path.join(workdir, name))
    staging_name = f".import-{os.getpid()}"
    staging = os.path.join(workdir, staging_name)
    with checkpoints.get_manager(staging, keep=1) as manager:
      checkpoints.save(manager, step, state)
      checkpoints.check_saves(manager, wait=True)
    files.write_text(os.path.join(staging, "checkpoints", workdir_lib.NEW_SENTINEL), "")
    files.write_json(os.path.join(staging, "imported_from.json"), provenance)
    files.write_json(os.path.join(staging, workdir_lib.CONFIG_FILE), plain, sort_keys=True,
                     allow_nan=True)
    # Complete: from here on the import is finished, now or by the next holder of the lock.
    files.write_json(os.path.join(workdir, workdir_lib.IMPORT_MARKER),
                     {"staging": staging_name, "step": step})
    moved = workdir_lib.finish_import(workdir)
  if moved:
    logging.warning("Kept the workdir's previous files: %s", ", ".join(moved))


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                      path: str | os.PathLike, *, step: int | None = None,
                      overwrite: bool = False) -> int:
  """Writes checkpoint `step` (None: the latest) of `workdir` as a reference `.pth` file
  (see `export_state`), readable by score_sde_pytorch's `restore_checkpoint`. The file is
  written atomically (a temporary file renamed into place: an interrupt leaves the old file
  or none), and an existing `path` is replaced only with `overwrite`.

  Returns:
    The exported step.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in `workdir`.
    FileExistsError: `path` exists and `overwrite` is False (checked before any work).
  """
  files.check_new(path, overwrite=overwrite, flag="--overwrite")
  workdir_lib.check_workdir(os.fspath(workdir), must_exist=True)
  loaded = programs.restore_run(config, os.fspath(workdir), step)
  state, step = loaded.state, loaded.step
  to_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731
  obj = export_state(config, to_numpy(state.params), to_numpy(state.ema_params),
                     to_numpy(state.constants), step)
  torch_zip.save(obj, path, overwrite=overwrite, flag="--overwrite")
  logging.info("Exported step %d of %s to %s (Adam moments not exported)", step, workdir, path)
  return step


# --- facebookresearch/DiT checkpoints (--format=dit) ------------------------------------------

# `dit_weights.infer_config` names -> the config fields that hold them.
_DIT_CONFIG_FIELDS = {"hidden_size": "model.hidden_size", "patch_size": "model.patch_size",
                      "depth": "model.depth", "mlp_ratio": "model.mlp_ratio",
                      "learn_sigma": "model.learn_sigma", "num_classes": "model.num_classes",
                      "in_channels": "data.num_channels", "image_size": "data.image_size"}


def _dit_fitting_fields(state_dict: dict) -> str:
  """The `--config.<field>=<value>` overrides a DiT state dict fits (a published size by
  name when its shape is one; `num_heads` is not in the weights)."""
  fits = dit_weights.infer_config(state_dict)
  fields = {_DIT_CONFIG_FIELDS[k]: v for k, v in fits.items() if k in _DIT_CONFIG_FIELDS}
  size = next((name for name, s in DIT_SIZES.items()
               if all(fits.get(k) == v for k, v in s.items() if k != "num_heads")), None)
  if size is not None:
    for key in ("model.hidden_size", "model.patch_size", "model.depth"):
      fields.pop(key, None)
    fields = {"model.dit_size": size, **fields}
  else:
    fields = {"model.dit_size": None, **fields}
  return " ".join(f"--config.{k}={v}" for k, v in fields.items())


def _dit_variables(state_dict: dict, config: ml_collections.ConfigDict, where: str) -> dict:
  """`dit_weights.params_from_reference` for the config's network; a mismatch names the
  first key, both shapes and the config fields that would fit."""
  net = networks.get_model(config)
  try:
    return dit_weights.params_from_reference(state_dict, net, networks.image_shape(config))
  except ValueError as e:
    first = str(e).split(";", 1)[0]
    raise CheckpointMismatchError(
        f"{where}: the checkpoint does not fit the config: {first}; the config fields that "
        f"fit it: {_dit_fitting_fields(state_dict)} (and model.num_heads, which the weights "
        "do not tell)") from None


def _dit_step(path: str) -> int:
  """facebookresearch/DiT's train.py names its checkpoints by step (`0400000.pt`); others 0."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return int(stem) if stem.isdigit() else 0


def import_dit_checkpoint(config: ml_collections.ConfigDict, checkpoint_path: str | os.PathLike,
                          workdir: str | os.PathLike, *, overwrite: bool = False) -> int:
  """Writes a facebookresearch/DiT checkpoint as an orbax checkpoint of `workdir`, for a DiT
  config (`model.name='dit'`, e.g. `configs/imagenet256_dit.py:XL/2`).

  A training checkpoint of train.py (`{"model", "ema", "opt", "args"}`) gives its "ema"
  weights to the EMA parameters and its "model" weights to the parameters; a bare state
  dict (the published `DiT-XL-2-256x256.pt`, EMA weights) gives both. The step is the file
  name's when it is a number (train.py's `0400000.pt`), else 0; the optimizer state starts
  fresh (the AdamW moments in "opt" are not converted). The file is read without torch and
  without executing pickled code (`io.dit_files`). Then `programs.load_run(workdir)` is the
  imported network; also writes `config.json` and `imported_from.json`.

  Returns:
    The imported step.

  Raises:
    ValueError: not a DiT config (before reading anything).
    FileNotFoundError, FileExistsError, torch_zip.CheckpointFormatError: as
      `import_checkpoint`.
    CheckpointMismatchError: the weights do not fit the config's network (the first key, both
      shapes and the `--config.*` fields that would fit).
  """
  path = os.fspath(checkpoint_path)
  if models.MODELS.get(config.model.name) is not DiT:
    raise ValueError(f"--format=dit needs a DiT config (config.model.name='dit', e.g. "
                     f"configs/imagenet256_dit.py:XL/2), got config.model.name="
                     f"{config.model.name!r}")
  experiment.check_config(config, mode="sample")
  workdir = os.fspath(workdir)
  plain = _check_import_target(config, path, workdir, overwrite)
  model_sd, ema_sd = dit_files.read_dit_weights(path)
  _check_finite(model_sd, path, "model")
  variables = _dit_variables(model_sd, config, path)
  if ema_sd is model_sd:
    ema_variables = variables
  else:
    _check_finite(ema_sd, path, "ema")
    ema_variables = _dit_variables(ema_sd, config, path)
  step = _dit_step(path)
  _write_import(config, plain, workdir, step, variables["params"], ema_variables["params"],
                {k: v for k, v in variables.items() if k != "params"},
                dict(checkpoint=os.path.abspath(path), format="dit", step=step,
                     ema_params="ema" if ema_sd is not model_sd else "the bare state dict",
                     optimizer_state="re-initialized"))
  logging.info("Imported %s (step %d) into %s; the optimizer state is re-initialized", path,
               step, workdir)
  return step


def _check_finite(state_dict: dict, where: str, what: str) -> None:
  """CheckpointMismatchError if a floating entry of `state_dict` holds NaN or inf."""
  for key, array in state_dict.items():
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
      bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
      raise CheckpointMismatchError(
          f"{where}: {what} entry {key} holds {bad} non-finite value(s) (NaN or inf) of "
          f"{np.size(array)}; the checkpoint is corrupt or diverged, and would sample NaNs")


# --- every format of scripts/import_checkpoint.py ----------------------------------------------


def _no_yaml(format: str, yaml_path) -> None:
  if yaml_path is not None:
    raise ValueError(f"--yaml is an LDM / Stable Diffusion YAML of --format=ldm_vae; "
                     f"--format={format} takes none")


def _import_score_sde(checkpoint, workdir, *, config, overwrite: bool, yaml_path) -> dict:
  _no_yaml("score_sde", yaml_path)
  if config is None:
    raise ValueError("--format=score_sde needs --config (the experiment whose network the "
                     "checkpoint holds)")
  step = import_checkpoint(config, checkpoint, workdir, overwrite=overwrite)
  return dict(format="score_sde", step=step)


def _import_dit(checkpoint, workdir, *, config, overwrite: bool, yaml_path) -> dict:
  _no_yaml("dit", yaml_path)
  if config is None:
    raise ValueError("--format=dit needs --config (a DiT config, e.g. "
                     "configs/imagenet256_dit.py:XL/2)")
  step = import_dit_checkpoint(config, checkpoint, workdir, overwrite=overwrite)
  return dict(format="dit", step=step)


def _import_diffusers_vae(checkpoint, workdir, *, config, overwrite: bool, yaml_path) -> dict:
  del config  # the architecture is the folder's config.json
  _no_yaml("diffusers_vae", yaml_path)
  return autoencoder_run.import_diffusers_vae(checkpoint, workdir, overwrite=overwrite)


def _import_ldm_vae(checkpoint, workdir, *, config, overwrite: bool, yaml_path) -> dict:
  del config  # the architecture is inferred from the state dict, or is the YAML's
  return autoencoder_run.import_ldm_vae(checkpoint, workdir, overwrite=overwrite,
                                        yaml_path=yaml_path)


# --format -> importer(checkpoint, workdir, *, config, overwrite, yaml_path) -> dict describing
# the import.
FORMATS = {
    "score_sde": _import_score_sde,
    "dit": _import_dit,
    "diffusers_vae": _import_diffusers_vae,
    "ldm_vae": _import_ldm_vae,
}


def import_any(format: str, checkpoint: str | os.PathLike, workdir: str | os.PathLike, *,
               config: ml_collections.ConfigDict | None = None, overwrite: bool = False,
               yaml_path: str | os.PathLike | None = None) -> dict:
  """Imports `checkpoint` of `format` (a key of `FORMATS`) into `workdir`.

  Args:
    format: a key of `FORMATS`.
    checkpoint: the published checkpoint (file or folder).
    workdir: the run directory to write.
    config: the experiment config (`score_sde`, `dit`).
    overwrite: replace what the workdir holds (set aside, never deleted).
    yaml_path: an LDM / Stable Diffusion YAML of the checkpoint (`ldm_vae` only).

  Raises:
    ValueError: an unknown format, a missing config, a YAML for another format, or a
      checkpoint of another format or size (naming the file, the first mismatching key and
      both shapes); before compiling.
    FileNotFoundError, FileExistsError: as the format's importer.
  """
  check_choice("--format", format, FORMATS)
  return FORMATS[format](checkpoint, workdir, config=config, overwrite=overwrite,
                         yaml_path=yaml_path)
