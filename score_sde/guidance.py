"""Guided and controllable generation: transformations of score functions.

Guidance turns score functions into score functions, so every sampler in `score_sde.sampling`
takes the result unchanged:

    score_fn = guidance.classifier_free(cond_score_fn, y, w=w, null_label=num_classes)
    score_fn = guidance.classifier_guided(score_fn, log_prob_fn, y, scale=scale)
    x, nfe = sampling.sample(key, score_fn, sde, shape, method=...)

- Classifier-free guidance (Ho & Salimans 2022): s_w(x, t) = (1 + w) s(x, t, y) - w s(x, t, null).
  w = 0 is the conditional score, w = -1 the unconditional one. Both evaluations go into one
  network call on the batch stacked with itself (one NFE, counted as one: the samplers count
  calls of `score_fn`).
- Classifier guidance (Dhariwal & Nichol 2021; Song et al. 2021, sec. 5):
  s(x, t) + scale * grad_x log p_t(y | x); with the exact noisy classifier and scale 1 this is
  exactly the conditional score grad_x log p_t(x | y).

Inpainting and colorization fix part of the image and sample the rest (`inpaint`,
`colorize`). Both are one linear constraint: in a per-pixel orthonormal channel basis `M`
(the identity for inpainting; a basis whose first axis is the gray level for colorization),
the coordinates where `mask` is 1 are known. Two schemes:

- `"reimpose"` (predictor-corrector only; Song et al. 2021, appendix I.2): after every corrector
  and predictor step at time t, the known coordinates are replaced by a draw of
  p_0t(x_t | known) = N(alpha(t) known, sigma(t)^2). This is the reference codebase's
  inpainter / colorizer with two fixes: the reference re-imposes the known pixels on `x_mean`
  using the already noised `x` for the unknown ones (`x_mean = x * (1 - mask) + ...`), so with
  denoising its output's unknown pixels still carry the last step's noise; here `x_mean` keeps
  its own unknown pixels. And it noises the known pixels to the step's start time t after the
  predictor has moved x to the next time; here to the time x is at.
- `"score"` (every sampler, deterministic ones included): the score function sees the known
  coordinates on a fixed noise path, alpha(t) known + sigma(t) z with one z per sample, and the
  sampler integrates the rest. A smooth vector field (adaptive ODE solvers need one), and
  the samplers need no change.

Both are approximations of sampling p(x_unknown | x_known): the unknown coordinates are driven
by the score of the joint at a point whose known part is a noisy version of the data, not by
the conditional score. docs/guidance.md gives their measured bias on a Gaussian mixture.
Both end by setting the known coordinates to their values exactly.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sampling
from score_sde.sde import SDE, ScoreFn, batch_scalar
from score_sde.checks import check_choice

Array = jax.Array
CondScoreFn = Callable[[Array, Array, Array], Array]
LogProbFn = Callable[[Array, Array, Array], Array]


# --------------------------------------------------------------------------------------------
# Class labels
# --------------------------------------------------------------------------------------------


def check_labels(y, num_classes: int, *, allow_null: bool = True,
                 what: str = "class label") -> None:
  """Raises ValueError unless `y` (int or array of ints) lies in [0, num_classes - 1]
  (or equals the null label `num_classes` when `allow_null`). Traced arrays are not checked.

  Raises:
    ValueError: a label out of range, a non-integer label or num_classes < 1.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or (
      num_classes < 1):
    raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
  if isinstance(y, jax.core.Tracer):
    return
  values = np.asarray(y)
  if values.dtype.kind not in "iu":
    raise ValueError(f"{what} must be an integer (or integer array), got {y!r}")
  top = num_classes if allow_null else num_classes - 1
  bad = values[(values < 0) | (values > top)]
  if bad.size:
    null = f" or the null label {num_classes}" if allow_null else ""
    raise ValueError(f"{what} {bad.tolist()[:5]} out of range: valid 0..{num_classes - 1}"
                     f"{null}")


def _batch_labels(y, b: int) -> Array:
  """`y` (int or `[B]`) as a `[b]` int32 array."""
  y = jnp.asarray(y, jnp.int32)
  if y.ndim == 0:
    return jnp.full((b,), y, jnp.int32)
  if y.shape != (b,):
    raise ValueError(f"class labels must be an int or a [B] = [{b}] array, got shape {y.shape}")
  return y


def drop_labels(key: Array, labels: Array, rate: float, null_label: int) -> Array:
  """Classifier-free guidance training: each of `labels [B]` becomes `null_label` with
  probability `rate` (independently), so one network learns s(x, t, y) and s(x, t, null)."""
  drop = jax.random.bernoulli(key, rate, labels.shape)
  return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


# --------------------------------------------------------------------------------------------
# Classifier-free and classifier guidance
# --------------------------------------------------------------------------------------------


def classifier_free(cond_score_fn: CondScoreFn, y, *, w: float, null_label: int) -> ScoreFn:
  """Classifier-free guidance: s_w(x, t) = (1 + w) s(x, t, y) - w s(x, t, null).

  The conditional and unconditional scores come from ONE call of `cond_score_fn` on the batch
  concatenated with itself (labels `y` then `null_label`), so a network runs once per
  evaluation and each evaluation is one NFE (on a batch of 2B).

  Args:
    cond_score_fn: `cond_score_fn(x [B, *D], t [B], y [B] int) -> [B, *D]`, with
      `y == null_label` the unconditional score.
    y: the class, an int or `[B]` ints in [0, null_label] (null_label: unconditional).
    w: guidance weight (0: conditional, -1: unconditional, > 0: sharper classes).
    null_label: the label of the unconditional score (= the number of classes).

  Returns:
    `score_fn(x [B, *D], t [B]) -> [B, *D]`.

  Raises:
    ValueError: a label out of range.
  """
  check_labels(y, null_label, allow_null=True)
  def score_fn(x: Array, t: Array) -> Array:
    b = x.shape[0]
    labels = _batch_labels(y, b)
    null = jnp.full((b,), null_label, jnp.int32)
    both = cond_score_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                         jnp.concatenate([labels, null]))
    cond, uncond = both[:b], both[b:]
    return (1.0 + w) * cond - w * uncond

  return score_fn


def classifier_guided(score_fn: ScoreFn, log_prob_fn: LogProbFn, y, *, scale: float,
                      num_classes: int | None = None) -> ScoreFn:
  """Classifier guidance: s(x, t) + scale * grad_x log p_t(y | x).

  The gradient is `jax.grad` of the batch sum of `log_prob_fn(x, t, y)` (each example's log
  probability depends on its own x only).

  Args:
    score_fn: the unconditional `score_fn(x, t)`.
    log_prob_fn: `log_prob_fn(x [B, *D], t [B], y [B] int) -> [B]` = log p_t(y | x), e.g. a
      noise-conditional classifier (`score_sde.classifier.get_log_prob_fn`).
    y: the class, an int or `[B]` ints.
    scale: guidance scale (1: the Bayes-rule conditional score).
    num_classes: if given, labels are checked to lie in [0, num_classes - 1].

  Returns:
    `score_fn(x [B, *D], t [B]) -> [B, *D]`.

  Raises:
    ValueError: a label out of range (with `num_classes`), or a negative label.
  """
  if num_classes is not None:
    check_labels(y, num_classes, allow_null=False)
  elif not isinstance(y, jax.core.Tracer) and np.any(np.asarray(y) < 0):
    raise ValueError(f"class label must be >= 0, got {y!r}")

  def guided(x: Array, t: Array) -> Array:
    labels = _batch_labels(y, x.shape[0])
    grad = jax.grad(lambda v: jnp.sum(log_prob_fn(v, t, labels)))(x)
    return score_fn(x, t) + scale * grad

  return guided


# --------------------------------------------------------------------------------------------
# Inpainting and colorization
# --------------------------------------------------------------------------------------------

INPAINT_SCHEMES = ("reimpose", "score")


def gray_basis(channels: int = 3) -> np.ndarray:
  """An orthonormal `[C, C]` matrix whose first column is the gray direction (1, ..., 1) /
  sqrt(C): `x @ M` puts sqrt(C) * the channel mean in channel 0 (as the reference's
  colorizer), `z @ M.T` maps back."""
  basis = np.eye(channels)
  basis[:, 0] = 1.0
  q, _ = np.linalg.qr(basis)
  return q * np.sign(q[0, 0])


class Constraint:
  """Known values in a per-pixel orthonormal channel basis `M`: the coordinates of `x @ M`
  where `mask` is 1 are those of `known @ M`.

  Args:
    known: `[B, *D]` images holding the known values (the rest is ignored).
    mask: 1 (known) / 0 (unknown), broadcastable to `known` (in the basis M).
    basis: `[C, C]` orthonormal matrix acting on the last axis, or None (identity).
  """

  def __init__(self, known: Array, mask: Array, basis: np.ndarray | None = None):
    self.known = known
    self.mask = jnp.asarray(mask, known.dtype)
    self.basis = None if basis is None else jnp.asarray(basis, known.dtype)

  def _to(self, x: Array) -> Array:
    return x if self.basis is None else x @ self.basis

  def _back(self, z: Array) -> Array:
    return z if self.basis is None else z @ self.basis.T

  def merge(self, x: Array, value: Array) -> Array:
    """x with its known coordinates taken from `value` (both `[B, *D]`)."""
    return self._back(self.mask * self._to(value) + (1.0 - self.mask) * self._to(x))

  def noised(self, sde: SDE, t, noise: Array | None) -> Array:
    """alpha(t) known + sigma(t) noise (the mean when noise is None): a draw of p_0t."""
    tb = jnp.broadcast_to(jnp.asarray(t, self.known.dtype), self.known.shape[:1])
    mean, std = sde.marginal_prob(self.known, tb)
    return mean if noise is None else mean + batch_scalar(std, mean) * noise


def _check_known(known: Array, mask: Array, name: str = "mask") -> None:
  if known.ndim < 2:
    raise ValueError(f"images must be [B, *D], got shape {known.shape}")
  try:
    shape = np.broadcast_shapes(np.shape(mask), known.shape)
  except ValueError:
    shape = None
  if shape != known.shape:
    raise ValueError(f"{name} of shape {np.shape(mask)} does not match the images of shape "
                     f"{known.shape} (it must broadcast to them, e.g. [B, H, W, 1] or "
                     f"[H, W, 1])")


def sample_with_constraint(key: Array, score_fn: ScoreFn, sde: SDE, constraint: Constraint, *,
                           method: str = "pc", scheme: str | None = None, **options
                           ) -> tuple[Array, Array | int]:
  """Samples x given `constraint`'s known coordinates; returns `(x [B, *D], nfe)`.

  Args:
    key: PRNG key.
    score_fn: the (unconditional, or guided) score function of the images.
    sde: the forward SDE.
    constraint: the known coordinates.
    method: any sampler of `sampling.SAMPLERS`.
    scheme: 'reimpose' (re-impose noised known values after each step; method 'pc' only) or
      'score' (known values on a fixed noise path inside the score function; any method).
      Default: 'reimpose' for 'pc', 'score' otherwise.
    **options: the sampler's options (not `x_T`, which is set here).

  Returns:
    Samples whose known coordinates equal the known values, and the sampler's NFE.

  Raises:
    ValueError: unknown scheme, 'reimpose' with a method other than 'pc'.
  """
  scheme = ("reimpose" if method == "pc" else "score") if scheme is None else scheme
  check_choice("inpainting scheme", scheme, INPAINT_SCHEMES)
  if scheme == "reimpose" and method != "pc":
    raise ValueError(f"scheme 'reimpose' needs method 'pc' (it re-imposes the known values "
                     f"between predictor and corrector steps), got method {method!r}; use "
                     f"scheme 'score' with {method!r}")
  if "x_T" in options:
    raise ValueError("x_T is drawn here (the known values are imposed on it); do not pass it")
  known = constraint.known
  shape = known.shape
  k_prior, k_path, k_sample = jax.random.split(key, 3)
  prior = sde.prior_sampling(k_prior, shape).astype(known.dtype)
  if scheme == "reimpose":
    def step_hook(hook_key, x, t):
      noise = None if hook_key is None else jax.random.normal(hook_key, x.shape, x.dtype)
      return constraint.merge(x, constraint.noised(sde, t, noise))

    x_T = step_hook(k_path, prior, sde.T)
    x, nfe = sampling.sample(k_sample, score_fn, sde, shape, method="pc", x_T=x_T,
                             step_hook=step_hook, **options)
  else:
    z = jax.random.normal(k_path, shape, known.dtype)

    def replaced_score(x, t):
      return score_fn(constraint.merge(x, constraint.noised(sde, t, z)), t)

    x_T = constraint.merge(prior, constraint.noised(sde, sde.T, z))
    x, nfe = sampling.sample(k_sample, replaced_score, sde, shape, method=method, x_T=x_T,
                             **options)
  return constraint.merge(x, known), nfe


def inpaint(key: Array, score_fn: ScoreFn, sde: SDE, known: Array, mask: Array, *,
            method: str = "pc", scheme: str | None = None, **options
            ) -> tuple[Array, Array | int]:
  """Fills in the pixels where `mask` is 0, keeping those where it is 1.

  Args:
    key: PRNG key.
    score_fn: score function of the (model-scale, e.g. [-1, 1]) images.
    sde: the forward SDE.
    known: `[B, H, W, C]` (any `[B, *D]`) images in model scale; values at unknown pixels
      are ignored.
    mask: 1 where known, 0 where to fill in; broadcastable to `known` (e.g. `[B, H, W, 1]`).
    method, scheme, **options: as for `sample_with_constraint`.

  Returns:
    `(x [B, *D], nfe)`: x equals `known` where mask is 1.

  Raises:
    ValueError: a mask that does not broadcast to the images, bad sampler options.
  """
  known = jnp.asarray(known)
  _check_known(known, mask)
  return sample_with_constraint(key, score_fn, sde, Constraint(known, mask), method=method,
                                scheme=scheme, **options)


def colorize(key: Array, score_fn: ScoreFn, sde: SDE, gray: Array, *, method: str = "pc",
             scheme: str | None = None, channels: int = 3, **options
             ) -> tuple[Array, Array | int]:
  """Colour images whose channel mean is `gray`.

  Args:
    key, score_fn, sde: as for `inpaint`.
    gray: `[B, H, W, 1]` gray levels (or `[B, H, W, C]` images, whose channel mean is used),
      in model scale.
    method, scheme, **options: as for `sample_with_constraint`.
    channels: number of colour channels of the model's images.

  Returns:
    `(x [B, H, W, channels], nfe)` whose channel mean equals the gray level.

  Raises:
    ValueError: gray images that are not `[B, H, W, 1]` or `[B, H, W, channels]`.
  """
  gray = jnp.asarray(gray)
  if gray.ndim != 4 or gray.shape[-1] not in (1, channels):
    raise ValueError(f"gray images must be [B, H, W, 1] or [B, H, W, {channels}], got shape "
                     f"{gray.shape}")
  known = jnp.broadcast_to(jnp.mean(gray, axis=-1, keepdims=True),
                           gray.shape[:-1] + (channels,))
  mask = jnp.zeros((channels,), known.dtype).at[0].set(1.0)
  constraint = Constraint(known, mask, gray_basis(channels))
  return sample_with_constraint(key, score_fn, sde, constraint, method=method, scheme=scheme,
                                **options)
