"""DiT: the Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers",
ICCV 2023), layer for layer the network of facebookresearch/DiT `models.py`.

    net = DiT(**DIT_SIZES["XL/2"], num_classes=1000, learn_sigma=True)
    variables = net.init(key, x, labels)                # {'params', 'constants'}
    out = net.apply(variables, x, labels, class_labels=y)   # x [B, H, W, C] -> [B, H, W, 2C]

The image is cut into p x p patches, each patch a token (a linear patch embedding plus a fixed
2-D sine-cosine position embedding); `depth` transformer blocks follow, each conditioned on
c = (timestep embedding + class embedding) through adaptive LayerNorm with zero-initialized
gates (adaLN-Zero); a final adaLN layer and a linear map give every token p * p * C_out values,
reassembled into the image ("unpatchify").

Where the reference keeps things, and where they are here:
- The position embedding is MAE's fixed sin-cos table. The reference stores it as a frozen
  `nn.Parameter` (`requires_grad=False`), so it is in every state dict as `pos_embed`
  `[1, T, D]` and in `model.parameters()` (and so in the published parameter counts). Here it
  is the `constants` collection's `pos_embed` (computed in NumPy at init, never trained or
  averaged, checkpointed, counted by `models.count_params`): counts equal the reference's.
- The null class of classifier-free guidance is row `num_classes` of the label table, which
  exists when `class_dropout_prob > 0` (as in the reference; the table then has
  num_classes + 1 rows).

Mixed precision as in the U-Nets (`layers.py`): parameters are float32; every dense layer runs
in `dtype` (its float32 parameters cast to it); LayerNorm statistics and the adaLN modulation
are float32, the attention logits and softmax float32, and the output is float32.

Attention is `jax.nn.dot_product_attention`. With `attention_implementation=None` (default)
JAX (0.10) runs its XLA implementation on every backend (einsum, float32 softmax, einsum;
XLA:GPU fuses it as it can); `'cudnn'` asks for cuDNN's fused flash-attention kernel on NVIDIA
GPUs (bfloat16 / float16 inputs only; it fails where cuDNN cannot run it).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models import layers

# The twelve published configurations (models.py `DiT_models`), keyed without the "DiT-" prefix.
DIT_SIZES: dict[str, dict[str, int]] = {
    "S/2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "S/4": dict(depth=12, hidden_size=384, patch_size=4, num_heads=6),
    "S/8": dict(depth=12, hidden_size=384, patch_size=8, num_heads=6),
    "B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "B/4": dict(depth=12, hidden_size=768, patch_size=4, num_heads=12),
    "B/8": dict(depth=12, hidden_size=768, patch_size=8, num_heads=12),
    "L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "L/4": dict(depth=24, hidden_size=1024, patch_size=4, num_heads=16),
    "L/8": dict(depth=24, hidden_size=1024, patch_size=8, num_heads=16),
    "XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "XL/4": dict(depth=28, hidden_size=1152, patch_size=4, num_heads=16),
    "XL/8": dict(depth=28, hidden_size=1152, patch_size=8, num_heads=16),
}

FREQUENCY_EMBEDDING_SIZE = 256  # the timestep's sinusoidal features before the MLP
MAX_PERIOD = 10_000
LAYER_NORM_EPS = 1e-6
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def dit_size(name: str) -> dict[str, int]:
  """The fields (`depth`, `hidden_size`, `patch_size`, `num_heads`) of a published size.

  Args:
    name: e.g. 'XL/2' or 'DiT-XL/2'.

  Raises:
    ValueError: an unknown name (the message lists the valid ones).
  """
  key = name[len("DiT-"):] if name.startswith("DiT-") else name
  if key not in DIT_SIZES:
    raise ValueError(f"Unknown DiT size {name!r}; valid: {list(DIT_SIZES)}")
  return dict(DIT_SIZES[key])


# --- fixed embeddings (NumPy / pure functions) ----------------------------------------------


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """`[M, dim]` float64: `[sin(pos w_i), cos(pos w_i)]`, w_i = 10000^(-i / (dim/2)), i < dim/2."""
  omega = 1.0 / MAX_PERIOD ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """MAE's fixed 2-D position embedding, `[grid_h * grid_w, dim]` float64.

  Token k = row * grid_w + col (row-major); dims [0, dim/2) encode the column, [dim/2, dim)
  the row (MAE's `np.meshgrid(grid_w, grid_h)` puts w first).

  Raises:
    ValueError: `dim` not divisible by 4.
  """
  if dim % 4:
    raise ValueError(f"the 2-D sin-cos position embedding needs hidden_size divisible by 4, "
                     f"got {dim}")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def timestep_frequencies(t: jax.Array, dim: int = FREQUENCY_EMBEDDING_SIZE) -> jax.Array:
  """The reference's sinusoidal timestep features, `[B] -> [B, dim]` float32.

  `[cos(t w_i), sin(t w_i)]` with w_i = exp(-ln(10000) i / (dim/2)), i < dim/2 (the other
  order from the position embedding); `t` is used as given (the reference feeds the integer
  step, 0..999). An odd `dim` gets one zero column.
  """
  half = dim // 2
  freqs = np.exp(-math.log(MAX_PERIOD) * np.arange(half, dtype=np.float64) / half)
  args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _normal(stddev: float):
  """N(0, stddev^2), drawn flat and reshaped (fast to compile on CPU, see `layers.default_init`)."""
  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)
  return init


def _dense(features: int, dtype, name: str, kernel_init=None, zero: bool = False) -> nn.Dense:
  """A Linear of the reference: xavier-uniform kernel (or `kernel_init`, or zeros), zero bias."""
  if zero:
    kernel_init = nn.initializers.zeros
  return nn.Dense(features, kernel_init=kernel_init or layers.default_init(),
                  bias_init=nn.initializers.zeros, dtype=dtype, name=name)


def _modulated_layer_norm(x: jax.Array, shift: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """LayerNorm without affine (eps 1e-6) over the last axis, then `x (1 + scale) + shift` with
  the per-example `[B, D]` vectors broadcast over tokens; float32 inside, output `dtype`."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  h = (x32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)
  h = h * (1 + scale.astype(jnp.float32)[:, None, :]) + shift.astype(jnp.float32)[:, None, :]
  return h.astype(dtype)


# --- modules --------------------------------------------------------------------------------


class Attention(nn.Module):
  """timm's multi-head self-attention: `[B, T, D] -> [B, T, D]`. The `qkv` Linear's 3D outputs
  are (q, k, v) blocks of D, each split into `num_heads` heads; scale head_dim^-1/2."""

  num_heads: int
  dtype: jnp.dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    qkv = _dense(3 * d, self.dtype, "qkv")(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, heads, head_dim]
    h = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    return _dense(d, self.dtype, "proj")(h.reshape(b, t, d))


class Mlp(nn.Module):
  """`fc1` -> GELU (tanh approximation) -> `fc2`: `[B, T, D] -> [B, T, D]`."""

  hidden_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.gelu(_dense(self.hidden_features, self.dtype, "fc1")(x), approximate=True)
    return _dense(x.shape[-1], self.dtype, "fc2")(h)


class DiTBlock(nn.Module):
  """A transformer block with adaLN-Zero conditioning: `(x [B, T, D], c [B, D]) -> [B, T, D]`.

  `adaLN_modulation` (SiLU, then a zero-initialized Linear D -> 6D) gives (shift_msa,
  scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp); then
  x += gate_msa * attn(modulate(LN(x))), x += gate_mlp * mlp(modulate(LN(x))).
  """

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    d = x.shape[-1]
    mod = _dense(6 * d, self.dtype, "adaLN_modulation", zero=True)(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = Attention(self.num_heads, self.dtype, self.attention_implementation, name="attn")(
        _modulated_layer_norm(x, shift_msa, scale_msa, self.dtype))
    x = x + gate_msa[:, None, :] * h
    h = Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(
        _modulated_layer_norm(x, shift_mlp, scale_mlp, self.dtype))
    return x + gate_mlp[:, None, :] * h


class DiT(nn.Module):
  """The Diffusion Transformer. `__call__(x [B, H, W, C], labels [B]) -> [B, H, W, C_out]`.

  Attributes:
    patch_size: p; H and W must be multiples of it (T = H W / p^2 tokens).
    hidden_size: D, the token width (a multiple of 4 and of `num_heads`).
    depth: the number of transformer blocks.
    num_heads: attention heads (head_dim = D / num_heads).
    mlp_ratio: the MLP's hidden width is int(D * mlp_ratio).
    class_dropout_prob: with `train=True`, the probability of replacing a class label by the
      null class (classifier-free guidance training); > 0 also adds the null row.
    num_classes: class-conditional on this many classes; 0: unconditional (no label table).
    learn_sigma: output 2C channels, [:C] the mean (epsilon) prediction and [C:] the variance
      interpolation v of Nichol & Dhariwal; else C channels.
    dtype: compute dtype of the dense layers, float32 or bfloat16 (see the module docstring).
    attention_implementation: `jax.nn.dot_product_attention`'s `implementation`, None | 'xla'
      | 'cudnn'.
  """

  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  dtype: jnp.dtype = jnp.float32
  attention_implementation: str | None = None

  def __post_init__(self):
    for name in ("patch_size", "hidden_size", "depth", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"DiT {name} must be a positive int, got {value!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"DiT hidden_size {self.hidden_size} is not divisible by num_heads "
                       f"{self.num_heads}; valid num_heads: divisors of {self.hidden_size}")
    if self.hidden_size % 4:
      raise ValueError(f"DiT hidden_size must be a multiple of 4 (the 2-D sin-cos position "
                       f"embedding), got {self.hidden_size}")
    if self.num_classes < 0:
      raise ValueError(f"DiT num_classes must be >= 0 (0: unconditional), got {self.num_classes}")
    if not 0.0 <= self.class_dropout_prob < 1.0:
      raise ValueError(f"DiT class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
    if self.mlp_ratio <= 0 or int(self.hidden_size * self.mlp_ratio) < 1:
      raise ValueError(f"DiT mlp_ratio must be positive, got {self.mlp_ratio}")
    if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"Unknown attention_implementation {self.attention_implementation!r}; "
                       f"valid: {ATTENTION_IMPLEMENTATIONS}")
    super().__post_init__()

  @property
  def has_null_class(self) -> bool:
    """The label table has the null row `num_classes` (as the reference: dropout > 0)."""
    return self.num_classes > 0 and self.class_dropout_prob > 0

  def grid(self, height: int, width: int) -> tuple[int, int]:
    """The token grid `(H / p, W / p)` of an image.

    Raises:
      ValueError: H or W not divisible by the patch size.
    """
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"DiT patch_size {p} does not divide the image size {height}x{width}; "
                       f"valid patch sizes: the common divisors of {height} and {width}")
    return height // p, width // p

  def _class_embedding(self, class_labels, batch: int, train: bool) -> jax.Array | None:
    if self.num_classes == 0:
      if class_labels is not None:
        raise ValueError("class_labels given to an unconditional DiT (num_classes=0)")
      return None
    if class_labels is None:
      if not self.has_null_class:
        raise ValueError("class_labels=None means the null class, but this DiT has none "
                         "(class_dropout_prob=0); pass labels in [0, num_classes)")
      class_labels = jnp.full((batch,), self.num_classes, jnp.int32)
    if class_labels.shape != (batch,):
      raise ValueError(f"class_labels must be [B] = ({batch},), got shape {class_labels.shape}")
    class_labels = class_labels.astype(jnp.int32)
    if train and self.class_dropout_prob > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), (batch,)) < self.class_dropout_prob
      class_labels = jnp.where(drop, self.num_classes, class_labels)
    rows = self.num_classes + int(self.has_null_class)
    embed = nn.Embed(rows, self.hidden_size, embedding_init=_normal(0.02), dtype=self.dtype,
                     name="y_embedder")
    return embed(class_labels)

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False,
               class_labels: jax.Array | None = None) -> jax.Array:
    """The network output.

    Args:
      x: `[B, H, W, C]` images or latents.
      labels: `[B]` float time labels fed straight into the frequency embedding (the
        reference's integer step 0..999; for VP the wrapper's 999 t).
      train: training mode: class labels are dropped to the null class with probability
        `class_dropout_prob`, drawing from the 'dropout' rng.
      class_labels: `[B]` ints in [0, num_classes] (num_classes = null), or None for the
        null class everywhere.

    Returns:
      `[B, H, W, C_out]` float32, C_out = 2C with `learn_sigma` (mean, then variance values)
      else C.

    Raises:
      ValueError: bad shapes (x not 4-D, H or W not divisible by the patch size, labels not
        `[B]`), class labels for an unconditional net, or a stored position table of another
        grid.
    """
    if x.ndim != 4:
      raise ValueError(f"DiT input must be [B, H, W, C], got shape {x.shape}")
    b, height, width, channels = x.shape
    if labels.shape != (b,):
      raise ValueError(f"DiT labels must be [B] = ({b},), got shape {labels.shape}")
    gh, gw = self.grid(height, width)
    p, d, dtype = self.patch_size, self.hidden_size, self.dtype
    out_channels = 2 * channels if self.learn_sigma else channels

    # Patch embedding: the reference's Conv2d(kernel = stride = p) as one Linear on the
    # flattened patches; here a patch is flattened in (i, j, c) order (NHWC), the kernel is
    # `[p * p * C, D]` (the converter reorders the reference's (c, i, j)).
    patches = x.astype(dtype).reshape(b, gh, p, gw, p, channels).transpose(0, 1, 3, 2, 4, 5)
    h = _dense(d, dtype, "x_embedder")(patches.reshape(b, gh * gw, p * p * channels))
    pos = self.variable(
        layers.CONSTANTS, "pos_embed",
        lambda: jnp.asarray(sincos_pos_embed_2d(d, gh, gw)[None], jnp.float32))
    if pos.value.shape != (1, gh * gw, d):
      raise ValueError(f"DiT pos_embed holds {pos.value.shape}, but a {height}x{width} input "
                       f"needs (1, {gh * gw}, {d}) (another image size than at init?)")
    h = h + jax.lax.stop_gradient(pos.value).astype(dtype)

    # Conditioning c = timestep embedding + class embedding, [B, D].
    t_freq = timestep_frequencies(labels)
    c = _dense(d, dtype, "t_embedder_mlp_0", kernel_init=_normal(0.02))(t_freq)
    c = _dense(d, dtype, "t_embedder_mlp_2", kernel_init=_normal(0.02))(nn.silu(c))
    y = self._class_embedding(class_labels, b, train)
    if y is not None:
      c = c + y

    for i in range(self.depth):
      h = DiTBlock(self.num_heads, self.mlp_ratio, dtype, self.attention_implementation,
                   name=f"blocks_{i}")(h, c)

    # Final layer: adaLN (shift, scale) -> LN, modulate -> zero-initialized Linear.
    shift, scale = jnp.split(
        _dense(2 * d, dtype, "final_layer_adaLN_modulation", zero=True)(nn.silu(c)), 2, axis=-1)
    h = _dense(p * p * out_channels, dtype, "final_layer_linear", zero=True)(
        _modulated_layer_norm(h, shift, scale, dtype))
    # Unpatchify: each token's vector is (i, j, c), c fastest.
    h = h.astype(jnp.float32).reshape(b, gh, gw, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, height, width, out_channels)
