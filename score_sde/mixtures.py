"""Gaussian-mixture data, whose diffused densities and scores are known in closed form.

If p_0 = sum_k w_k N(mu_k, s_k^2 I) and the SDE's kernel is N(alpha(t) x_0, sigma(t)^2 I),
then p_t = sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) exactly. That gives an exact
score function for any SDE in `score_sde.sde`, against which samplers, likelihoods and the
sampler comparison are checked without training anything.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from score_sde.sde import SDE


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """An isotropic Gaussian mixture over events of shape `event_shape`.

  Attributes:
    weights: K mixture weights, summing to 1.
    means: K means, each a flat tuple of prod(event_shape) numbers.
    stds: K per-component standard deviations (isotropic).
    event_shape: shape of one example, e.g. `(2,)` or `(8, 8, 1)`.
  """

  weights: tuple[float, ...]
  means: tuple[tuple[float, ...], ...]
  stds: tuple[float, ...]
  event_shape: tuple[int, ...]

  def __post_init__(self):
    k, d = len(self.weights), int(np.prod(self.event_shape))
    if len(self.means) != k or len(self.stds) != k:
      raise ValueError(f"weights, means and stds need the same length, got {k}, "
                       f"{len(self.means)}, {len(self.stds)}")
    if any(len(m) != d for m in self.means):
      raise ValueError(f"each mean needs prod(event_shape) = {d} entries")
    if not math.isclose(sum(self.weights), 1.0, rel_tol=1e-6):
      raise ValueError(f"weights must sum to 1, got {sum(self.weights)}")

  @property
  def dim(self) -> int:
    return int(np.prod(self.event_shape))

  def _params(self, dtype):
    return (jnp.asarray(self.weights, dtype), jnp.asarray(self.means, dtype),
            jnp.asarray(self.stds, dtype))

  def sample(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Draws `n` examples. Returns `(x [n, *event_shape], component [n] int)`."""
    k_comp, k_noise = jax.random.split(key)
    w, mu, s = self._params(jnp.float32)
    comp = jax.random.choice(k_comp, len(self.weights), (n,), p=w)
    x = mu[comp] + s[comp][:, None] * jax.random.normal(k_noise, (n, self.dim))
    return x.reshape((n,) + self.event_shape), comp

  def _component_logps(self, sde: SDE | None, x: jax.Array, t) -> jax.Array:
    """log(w_k N(x; alpha mu_k, var_k I)) for each component: `[B, K]`."""
    x = x.reshape(x.shape[0], -1)
    w, mu, s = self._params(x.dtype)
    alpha, sigma = _kernel(sde, t, x)
    var = alpha[:, None] ** 2 * s[None, :] ** 2 + sigma[:, None] ** 2  # [B, K]
    diff2 = jnp.sum((x[:, None, :] - alpha[:, None, None] * mu[None]) ** 2, axis=-1)
    return (jnp.log(w)[None] - 0.5 * self.dim * jnp.log(2 * math.pi * var)
            - 0.5 * diff2 / var)

  def log_prob(self, x: jax.Array, t=None, sde: SDE | None = None) -> jax.Array:
    """log p_t(x) in nats, `[B]`. With `sde=None` (or t=None) this is the data density p_0."""
    return jax.nn.logsumexp(self._component_logps(sde, x, t), axis=-1)

  def responsibilities(self, x: jax.Array, t=None, sde: SDE | None = None) -> jax.Array:
    """Posterior probability of each component given x_t: `[B, K]`."""
    return jax.nn.softmax(self._component_logps(sde, x, t), axis=-1)

  def score(self, x: jax.Array, t=None, sde: SDE | None = None) -> jax.Array:
    """grad_x log p_t(x), shaped like `x`."""
    shape = x.shape
    flat = x.reshape(shape[0], -1)
    w, mu, s = self._params(x.dtype)
    alpha, sigma = _kernel(sde, t, flat)
    var = alpha[:, None] ** 2 * s[None, :] ** 2 + sigma[:, None] ** 2  # [B, K]
    r = self.responsibilities(x, t, sde)  # [B, K]
    comp_scores = -(flat[:, None, :] - alpha[:, None, None] * mu[None]) / var[..., None]
    return jnp.sum(r[..., None] * comp_scores, axis=1).reshape(shape)

  def score_fn(self, sde: SDE):
    """The exact score function `score_fn(x, t)` of the diffused mixture under `sde`."""
    return lambda x, t: self.score(x, t, sde)


def _kernel(sde: SDE | None, t, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(alpha [B], sigma [B]) at time t; the identity kernel (1, 0) when sde or t is None."""
  b = x.shape[0]
  if sde is None or t is None:
    return jnp.ones((b,), x.dtype), jnp.zeros((b,), x.dtype)
  t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (b,))
  return sde.alpha(t).astype(x.dtype), sde.sigma(t).astype(x.dtype)


def three_gaussians_mixture() -> GaussianMixture:
  """A 2-D, 3-component mixture with unequal weights and widths: the default toy problem."""
  return GaussianMixture(weights=(0.5, 0.3, 0.2),
                         means=((-1.5, 0.0), (1.0, 1.2), (1.0, -1.2)),
                         stds=(0.25, 0.35, 0.2), event_shape=(2,))


def image_mixture(event_shape=(8, 8, 1), seed: int = 0) -> GaussianMixture:
  """A 2-component mixture over small images: two random patterns in [-1, 1]."""
  rng = np.random.default_rng(seed)
  d = int(np.prod(event_shape))
  means = tuple(tuple(float(v) for v in rng.uniform(-0.8, 0.8, d)) for _ in range(2))
  return GaussianMixture(weights=(0.6, 0.4), means=means, stds=(0.1, 0.15),
                         event_shape=tuple(event_shape))


@dataclasses.dataclass(frozen=True)
class ClassConditionalMixture:
  """Labelled data: class y has prior `class_weights[y]` and data p_0(x | y) = `classes[y]`.

  Everything guidance needs is exact at every t: the conditional score grad log p_t(x | y),
  the unconditional score grad log p_t(x) (the mixture of all classes), and the noisy
  classifier log p_t(y | x). Label `num_classes` is the null label (unconditional), as for
  the networks.

  Attributes:
    classes: one `GaussianMixture` per class, all with the same `event_shape`.
    class_weights: the class priors p(y), summing to 1.
  """

  classes: tuple[GaussianMixture, ...]
  class_weights: tuple[float, ...]

  def __post_init__(self):
    if len(self.classes) != len(self.class_weights) or not self.classes:
      raise ValueError(f"need one weight per class, got {len(self.classes)} classes and "
                       f"{len(self.class_weights)} weights")
    shapes = {m.event_shape for m in self.classes}
    if len(shapes) != 1:
      raise ValueError(f"all classes need the same event_shape, got {sorted(shapes)}")
    if not math.isclose(sum(self.class_weights), 1.0, rel_tol=1e-6):
      raise ValueError(f"class_weights must sum to 1, got {sum(self.class_weights)}")

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  @property
  def event_shape(self) -> tuple[int, ...]:
    return self.classes[0].event_shape

  def marginal(self) -> GaussianMixture:
    """The unconditional data p_0(x) = sum_y p(y) p_0(x | y), one flat mixture."""
    return GaussianMixture(
        weights=tuple(p * w for p, m in zip(self.class_weights, self.classes)
                      for w in m.weights),
        means=tuple(mu for m in self.classes for mu in m.means),
        stds=tuple(s for m in self.classes for s in m.stds), event_shape=self.event_shape)

  def component_classes(self) -> np.ndarray:
    """The class of each component of `marginal()`: `[K]` ints."""
    return np.concatenate([np.full(len(m.weights), y) for y, m in enumerate(self.classes)])

  def sample(self, key: jax.Array, n: int, y: int | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """`n` draws of p_0(x | y) (of p_0(x) when y is None or the null label).

    Returns `(x [n, *event_shape], labels [n] int)`.
    """
    if y is None or y == self.num_classes:
      x, comp = self.marginal().sample(key, n)
      return x, jnp.asarray(self.component_classes())[comp]
    x, _ = self.classes[y].sample(key, n)
    return x, jnp.full((n,), y, jnp.int32)

  def _masked_logps(self, sde: SDE | None, x: jax.Array, t, y: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """(all component log-densities of the marginal `[B, K]`, the same with the components
    of other classes than y set to -inf; y == num_classes keeps all)."""
    logps = self.marginal()._component_logps(sde, x, t)
    comp_class = jnp.asarray(self.component_classes())
    y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), x.shape[:1])
    keep = (comp_class[None, :] == y[:, None]) | (y[:, None] == self.num_classes)
    return logps, jnp.where(keep, logps, -jnp.inf)

  def cond_score(self, x: jax.Array, t, y, sde: SDE | None = None) -> jax.Array:
    """grad_x log p_t(x | y), shaped like x; `y` an int or `[B]` ints, num_classes = null."""
    shape = x.shape
    flat = x.reshape(shape[0], -1)
    marginal = self.marginal()
    _, mu, s = marginal._params(x.dtype)
    alpha, sigma = _kernel(sde, t, flat)
    var = alpha[:, None] ** 2 * s[None, :] ** 2 + sigma[:, None] ** 2  # [B, K]
    r = jax.nn.softmax(self._masked_logps(sde, x, t, y)[1], axis=-1)
    comp_scores = -(flat[:, None, :] - alpha[:, None, None] * mu[None]) / var[..., None]
    return jnp.sum(r[..., None] * comp_scores, axis=1).reshape(shape)

  def class_log_prob(self, x: jax.Array, t, y, sde: SDE | None = None) -> jax.Array:
    """The exact noisy classifier log p_t(y | x_t) in nats, `[B]` (0 for the null label)."""
    logps, masked = self._masked_logps(sde, x, t, y)
    return jax.nn.logsumexp(masked, axis=-1) - jax.nn.logsumexp(logps, axis=-1)

  def cond_score_fn(self, sde: SDE):
    """The exact `cond_score_fn(x, t, y)` of the diffused data under `sde`."""
    return lambda x, t, y: self.cond_score(x, t, y, sde)

  def log_prob_fn(self, sde: SDE):
    """The exact classifier `log_prob_fn(x, t, y) -> [B]` = log p_t(y | x) under `sde`."""
    return lambda x, t, y: self.class_log_prob(x, t, y, sde)


def conditional_on_known(mix: GaussianMixture, known_mask: np.ndarray, known: np.ndarray
                         ) -> GaussianMixture:
  """The exact p_0(x_u | x_k = known) of an isotropic mixture: a mixture over the unknown
  coordinates (flattened), with weights w_k N(known; mu_k[known], s_k^2 I) renormalized.

  Args:
    mix: the data mixture.
    known_mask: bool, shaped like one example (or flat): True where the value is known.
    known: the known values, shaped like one example (values at unknown places ignored).

  Returns:
    A `GaussianMixture` with `event_shape = (number of unknown coordinates,)`.
  """
  m = np.asarray(known_mask, bool).reshape(-1)
  v = np.asarray(known, np.float64).reshape(-1)[m]
  w, mu, s = (np.asarray(a, np.float64) for a in (mix.weights, mix.means, mix.stds))
  logw = (np.log(w) - 0.5 * m.sum() * np.log(2 * np.pi * s**2)
          - 0.5 * np.sum((v[None] - mu[:, m]) ** 2, axis=1) / s**2)
  post = np.exp(logw - logw.max())
  post /= post.sum()
  return GaussianMixture(weights=tuple(float(p) for p in post),
                         means=tuple(tuple(float(a) for a in row) for row in mu[:, ~m]),
                         stds=tuple(float(a) for a in s), event_shape=(int((~m).sum()),))


def mode_weight_tv(mixture: GaussianMixture, x) -> float:
  """Total variation between the samples' component frequencies and the mixture weights.

  Each sample is assigned to the component of largest posterior responsibility under the
  data density p_0; the TV is 0.5 sum_k |freq_k - w_k|. It catches samplers that get the
  mode weights wrong while each mode looks right.

  Args:
    mixture: the data mixture.
    x: samples `[N, *event_shape]`.

  Returns:
    The TV distance in [0, 1].
  """
  resp = mixture.responsibilities(jnp.asarray(x, jnp.float32))
  comp = np.argmax(np.asarray(resp), axis=-1)
  freq = np.bincount(comp, minlength=len(mixture.weights)) / len(comp)
  return float(0.5 * np.sum(np.abs(freq - np.asarray(mixture.weights))))
