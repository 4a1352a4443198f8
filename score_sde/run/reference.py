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
import json
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
from score_sde.io import checkpoints, torch_zip
from score_sde.io.checkpoints import CheckpointMismatchError
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

  Args:
    config: the experiment config matching the checkpoint's network.
    checkpoint_path: the reference `.pth` file.
    workdir: the run directory to write.
    overwrite: replace existing checkpoints of `workdir` (otherwise refuse).

  Returns:
    The imported step.

  Raises:
    FileNotFoundError: no such checkpoint file.
    FileExistsError: `workdir` already has checkpoints and `overwrite` is False.
    torch_zip.CheckpointFormatError: not a torch checkpoint, or unsafe pickle contents.
    CheckpointMismatchError: the checkpoint does not fit the config's network.
  """
  path = os.fspath(checkpoint_path)
  ckpt_dir = checkpoints.checkpoint_dir(workdir)
  existing = os.path.isdir(ckpt_dir) and any(
      name.isdigit() for name in os.listdir(ckpt_dir))
  if existing and not overwrite:
    raise FileExistsError(f"{ckpt_dir} already holds checkpoints "
                          f"({sorted(os.listdir(ckpt_dir))}); pass overwrite=True "
                          "(--overwrite) to replace them, or choose another workdir")
  weights = import_state(config, torch_zip.load(path), where=path)
  optimizer = experiment.make_optimizer(config)
  params = jax.tree_util.tree_map(jnp.asarray, weights.params)
  state = programs.TrainState(
      step=jnp.asarray(weights.step, jnp.int32), params=params,
      opt_state=optimizer.init(params),
      ema_params=jax.tree_util.tree_map(jnp.asarray, weights.ema_params),
      constants=jax.tree_util.tree_map(jnp.asarray, weights.constants))
  if existing:
    shutil.rmtree(ckpt_dir)
  os.makedirs(workdir, exist_ok=True)
  with checkpoints.get_manager(workdir, keep=1) as manager:
    checkpoints.save(manager, weights.step, state)
    manager.wait_until_finished()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  with open(os.path.join(workdir, "imported_from.json"), "w") as f:
    json.dump({"checkpoint": os.path.abspath(path), "step": weights.step,
               "optimizer_state": "re-initialized"}, f, indent=2)
  logging.info("Imported %s (step %d) into %s; the optimizer state is re-initialized (the "
               "reference's Adam moments are not converted)", path, weights.step, ckpt_dir)
  return weights.step


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                      path: str | os.PathLike, *, step: int | None = None) -> int:
  """Writes checkpoint `step` (None: the latest) of `workdir` as a reference `.pth` file
  (see `export_state`), readable by score_sde_pytorch's `restore_checkpoint`.

  Returns:
    The exported step.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in `workdir`.
  """
  loaded = programs.restore_run(config, os.fspath(workdir), step)
  state, step = loaded.state, loaded.step
  to_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731
  obj = export_state(config, to_numpy(state.params), to_numpy(state.ema_params),
                     to_numpy(state.constants), step)
  torch_zip.save(obj, path)
  logging.info("Exported step %d of %s to %s (Adam moments not exported)", step, workdir, path)
  return step


# --- every format of scripts/import_checkpoint.py ----------------------------------------------


def _import_score_sde(checkpoint, workdir, *, config, overwrite: bool) -> dict:
  if config is None:
    raise ValueError("--format=score_sde needs --config (the experiment whose network the "
                     "checkpoint holds)")
  step = import_checkpoint(config, checkpoint, workdir, overwrite=overwrite)
  return dict(format="score_sde", step=step)


def _import_diffusers_vae(checkpoint, workdir, *, config, overwrite: bool) -> dict:
  del config  # the architecture is the folder's config.json
  return autoencoder_run.import_diffusers_vae(checkpoint, workdir, overwrite=overwrite)


def _import_ldm_vae(checkpoint, workdir, *, config, overwrite: bool) -> dict:
  del config  # the architecture is inferred from the state dict
  return autoencoder_run.import_ldm_vae(checkpoint, workdir, overwrite=overwrite)


# --format -> importer(checkpoint, workdir, *, config, overwrite) -> dict describing the import.
FORMATS = {
    "score_sde": _import_score_sde,
    "diffusers_vae": _import_diffusers_vae,
    "ldm_vae": _import_ldm_vae,
}


def import_any(format: str, checkpoint: str | os.PathLike, workdir: str | os.PathLike, *,
               config: ml_collections.ConfigDict | None = None, overwrite: bool = False
               ) -> dict:
  """Imports `checkpoint` of `format` (a key of `FORMATS`) into `workdir`.

  Raises:
    ValueError: an unknown format, a missing config, or a checkpoint of another format or
      size (naming the file, the first mismatching key and both shapes); before compiling.
    FileNotFoundError, FileExistsError: as the format's importer.
  """
  check_choice("--format", format, FORMATS)
  return FORMATS[format](checkpoint, workdir, config=config, overwrite=overwrite)
