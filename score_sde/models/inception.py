"""Inception-v3 in its FID form, in Flax: the network behind published FIDs.

The FID of Heusel et al. is defined on the 2048-d pool features of one particular network,
the TensorFlow graph `inception-2015-12-05`. pytorch-fid (and torch-fidelity) reproduce it as
torchvision's Inception-v3 with a few blocks changed, and ship its weights as
`pt_inception-2015-12-05-6726825d.pth`; this module is the same network in Flax:

* `InceptionA` / `InceptionC` / `InceptionE` average-pool their pool branch without counting
  the zero padding (TensorFlow's rule), and the last `InceptionE` (Mixed_7c) max-pools there;
* inputs in [0, 1] are resized bilinearly to 299 x 299 exactly as `torch.nn.functional
  .interpolate(mode='bilinear', align_corners=False)` does (no antialiasing), then mapped to
  [-1, 1];
* outputs: the 2048-d average-pooled features and the 1008 logits of its classifier (for
  the Inception Score).

The weights cannot be downloaded here: `score_sde.io.inception_files.load_inception_variables
(path)` reads the .pth file a user already has (with `torch_zip`'s restricted unpickler, no
code runs), and `variables_from_state_dict` turns it into this network's variables.
Submodule names follow the torch ones, so `convert_state_dict` is a renaming plus
transpositions.

    state_dict = inception_files.load_inception_variables("pt_inception-2015-12-05-6726825d.pth")
    variables = variables_from_state_dict(state_dict)
    pool, logits = InceptionV3().apply(variables, images)   # images [B, H, W, 3] in [0, 1]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILENAME)
FEATURE_DIM = 2048
NUM_LOGITS = 1008
INPUT_SIZE = 299


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TensorFlow's average pool: padded zeros are not counted.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride_2(x):
  return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionE(nn.Module):
  """`max_pool=True` is the FID graph's Mixed_7c, which max-pools its pool branch."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)],
                         -1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix of torch's bilinear interpolation with align_corners=False.

  Output pixel i samples the input at (i + 0.5) * in / out - 0.5, clamped below at 0, between
  its two neighbours (the upper one clamped at in - 1); no antialiasing when shrinking.
  """
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size))
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """x [B, H, W, C] -> [B, size, size, C], as torch's bilinear interpolate
  (align_corners=False); the identity when already that size."""
  h, w = x.shape[1:3]
  if (h, w) == (size, size):
    return x
  mh = jnp.asarray(bilinear_resize_matrix(h, size), x.dtype)
  mw = jnp.asarray(bilinear_resize_matrix(w, size), x.dtype)
  return jnp.einsum("ih,bhwc,jw->bijc", mh, x, mw, precision=jax.lax.Precision.HIGHEST)


class InceptionV3(nn.Module):
  """Inception-v3, FID variant. `__call__(x)` with x [B, H, W, 3] in [0, 1] returns
  `(pool [B, 2048], logits [B, 1008])`.

  Attributes:
    resize_input: resize to 299 x 299 first (as pytorch-fid does by default).
  """
  resize_input: bool = True

  @nn.compact
  def __call__(self, x):
    if self.resize_input:
      x = resize_bilinear(x, INPUT_SIZE)
    x = 2.0 * x - 1.0
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride_2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_stride_2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = x.mean(axis=(1, 2))
    return pool, nn.Dense(NUM_LOGITS, name="fc")(pool)


# ---- Weights: pytorch-fid's state dict -> variables (pure) --------------------------


def convert_state_dict(state_dict: dict[str, Any]) -> dict:
  """torch names and layouts -> this module's variables.

  `X.conv.weight` [O, I, kh, kw] -> params X/conv/kernel [kh, kw, I, O]; `X.bn.{weight, bias}`
  -> params X/bn/{scale, bias}; `X.bn.running_{mean, var}` -> batch_stats X/bn/{mean, var};
  `fc.weight` [1008, 2048] -> params fc/kernel (transposed). `num_batches_tracked` and the
  auxiliary classifier (`AuxLogits.*`) are dropped.
  """
  params: dict = {}
  stats: dict = {}

  def put(tree, path, value):
    for p in path[:-1]:
      tree = tree.setdefault(p, {})
    tree[path[-1]] = jnp.asarray(np.asarray(value, np.float32))

  for name, value in state_dict.items():
    parts = name.split(".")
    if parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
      continue
    if parts[0] == "fc" and len(parts) == 2:
      put(params, ["fc", "kernel" if parts[1] == "weight" else "bias"],
          np.transpose(value) if parts[1] == "weight" else value)
      continue
    module, kind, leaf = parts[:-2], parts[-2], parts[-1]
    if kind == "conv" and leaf == "weight":
      put(params, [*module, "conv", "kernel"], np.transpose(value, (2, 3, 1, 0)))
    elif kind == "bn" and leaf in ("weight", "bias"):
      put(params, [*module, "bn", "scale" if leaf == "weight" else "bias"], value)
    elif kind == "bn" and leaf in ("running_mean", "running_var"):
      put(stats, [*module, "bn", "mean" if leaf == "running_mean" else "var"], value)
    else:
      raise ValueError(f"unexpected entry {name!r} in an Inception-v3 state dict")
  return {"params": params, "batch_stats": stats}


def variables_from_state_dict(state_dict: dict[str, Any], where: str = "the state dict"
                              ) -> dict:
  """Variables of `InceptionV3` from pytorch-fid's state dict (`convert_state_dict`), checked
  against the network's shapes.

  Args:
    state_dict: torch name -> array, as `score_sde.io.inception_files.load_inception_variables`
      reads it from the `pt_inception-2015-12-05-*.pth` file.
    where: names the weights in the error message (e.g. the file).

  Raises:
    ValueError: not an Inception-v3 state dict of the FID form.
  """
  variables = convert_state_dict(state_dict)
  reference = jax.eval_shape(lambda: InceptionV3().init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, 75, 75, 3))))
  want = jax.tree.map(lambda a: a.shape, reference)
  got = jax.tree.map(lambda a: a.shape, variables)
  if want != got:
    raise ValueError(f"{where}: not the FID Inception-v3 (pytorch-fid's {WEIGHTS_FILENAME}): "
                     f"its tensors do not fit the network")
  return variables
