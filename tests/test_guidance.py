"""Tests of score_sde.guidance against a class-conditional Gaussian mixture, whose
conditional and unconditional diffused scores and noisy classifier p_t(y | x) are exact.

Fast: the exact identities (CFG at w = 0 / -1 is the conditional / unconditional score;
classifier guidance with the exact classifier at scale 1 is the conditional score; one
network call per CFG evaluation), labels, errors. Slow: every sampler draws the exact
conditional (and unconditional) distribution through guidance, and the inpainting schemes
keep the known pixels and match the exact conditional of the mixture within their measured
bias.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import guidance
from score_sde import mixtures
from score_sde import sampling
from score_sde import sde as sde_lib
from score_sde.run import inpainting_bias
from tests.test_sampling import assert_reproduces

SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.SubVPSDE(), "ve": sde_lib.VESDE()}
KEY = jax.random.key(0)

# Three classes in 2-D whose supports overlap, so guidance changes the distribution.
LABELLED = mixtures.ClassConditionalMixture(
    classes=(
        mixtures.GaussianMixture(weights=(0.6, 0.4), means=((-1.5, 0.0), (0.0, 1.3)),
                                 stds=(0.3, 0.25), event_shape=(2,)),
        mixtures.GaussianMixture(weights=(1.0,), means=((1.2, -0.4),), stds=(0.35,),
                                 event_shape=(2,)),
        mixtures.GaussianMixture(weights=(0.5, 0.5), means=((0.3, 0.4), (1.4, 1.2)),
                                 stds=(0.2, 0.3), event_shape=(2,)),
    ),
    class_weights=(0.5, 0.3, 0.2))
NULL = LABELLED.num_classes


def _points(n=64, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, 2)) * 1.5


# --------------------------------------------------------------------------------------------
# Exact identities (fast)
# --------------------------------------------------------------------------------------------


def test_the_labelled_mixture_is_consistent():
  """Its marginal is the prior-weighted union of the classes; the null label gives the
  marginal score; p_t(y | x) sums to one over y and is Bayes' rule."""
  sde = SDES["vp"]
  marginal = LABELLED.marginal()

  @jax.jit  # one program (eager, every operation compiles its own)
  def quantities():
    x, t = _points(), jnp.full((64,), 0.3)
    log_probs = jnp.stack([LABELLED.class_log_prob(x, t, y, sde) for y in range(NULL)], -1)
    bayes = [np.log(LABELLED.class_weights[y]) + LABELLED.classes[y].log_prob(x, t, sde)
             - marginal.log_prob(x, t, sde) for y in range(NULL)]
    cond_scores = [LABELLED.cond_score(x, t, y, sde) for y in range(NULL)]
    class_scores = [LABELLED.classes[y].score(x, t, sde) for y in range(NULL)]
    return (LABELLED.cond_score(x, t, NULL, sde), marginal.score(x, t, sde), log_probs,
            jnp.exp(log_probs).sum(-1), bayes, cond_scores, class_scores)

  null_score, marginal_score, log_probs, total, bayes, cond_scores, class_scores = quantities()
  np.testing.assert_allclose(null_score, marginal_score, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)
  for y in range(NULL):
    np.testing.assert_allclose(log_probs[:, y], bayes[y], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cond_scores[y], class_scores[y], rtol=1e-4, atol=1e-4)


def _counting(cond_score_fn):
  calls = []

  def wrapped(x, t, y):
    calls.append(x.shape[0])
    return cond_score_fn(x, t, y)

  return wrapped, calls


@functools.lru_cache(maxsize=None)
def _guided_combination(sde_name):
  """`(x, t, labels, w) -> (CFG score, conditional, unconditional)` under that SDE, compiled
  once with w traced, for every w."""
  sde = SDES[sde_name]

  @jax.jit
  def scores(x, t, labels, w):
    got = guidance.classifier_free(LABELLED.cond_score_fn(sde), labels, w=w,
                                   null_label=NULL)(x, t)
    return got, LABELLED.cond_score(x, t, labels, sde), LABELLED.marginal().score(x, t, sde)

  return scores


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("w", [0.0, -1.0, 2.5])
def test_classifier_free_is_the_guided_combination_in_one_call(sde_name, w):
  sde = SDES[sde_name]
  x, t = _points(), jnp.linspace(0.05, 1.0, 64)
  labels = jnp.arange(64) % NULL
  counted, calls = _counting(LABELLED.cond_score_fn(sde))
  jax.make_jaxpr(guidance.classifier_free(counted, labels, w=w, null_label=NULL))(x, t)
  assert calls == [128]  # one call, on the batch stacked with itself
  got, cond, uncond = _guided_combination(sde_name)(x, t, labels, w)
  np.testing.assert_allclose(got, (1 + w) * cond - w * uncond, rtol=1e-5, atol=1e-5)
  if w == 0:
    np.testing.assert_allclose(got, cond, rtol=1e-5, atol=1e-5)
  if w == -1:
    np.testing.assert_allclose(got, uncond, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_score(sde_name):
  """grad log p_t(x) + grad log p_t(y | x) = grad log p_t(x | y) (Bayes), at every t."""
  sde = SDES[sde_name]
  labels = (0, 2, np.arange(64) % NULL)

  @jax.jit  # one program for all the labels (eager, every operation compiles its own)
  def scores(x, t):
    guided = [guidance.classifier_guided(LABELLED.marginal().score_fn(sde),
                                         LABELLED.log_prob_fn(sde), y, scale=1.0,
                                         num_classes=NULL)(x, t) for y in labels]
    cond = [LABELLED.cond_score(x, t, y, sde) for y in labels]
    unguided = guidance.classifier_guided(LABELLED.marginal().score_fn(sde),
                                          LABELLED.log_prob_fn(sde), 1, scale=0.0)(x, t)
    return guided, cond, unguided, LABELLED.marginal().score(x, t, sde)

  guided, cond, unguided, uncond = scores(_points(), jnp.linspace(0.01, 1.0, 64))
  for got, expected in zip(guided, cond):
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)
  # Scale 0 is the unconditional score; scale 2 adds the classifier gradient twice.
  np.testing.assert_allclose(unguided, uncond, atol=1e-6)


def test_guided_score_functions_are_jittable_with_traced_labels():
  sde = SDES["vp"]
  x, t = _points(8), jnp.full((8,), 0.5)

  @jax.jit
  def f(y, w):
    return guidance.classifier_free(LABELLED.cond_score_fn(sde), y, w=w, null_label=NULL)(x, t)

  np.testing.assert_allclose(f(jnp.full((8,), 1), 0.0), LABELLED.cond_score(x, t, 1, sde),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("y", [-1, 4, [0, 1, 7], 1.5])
def test_labels_out_of_range_raise(y):
  fn = LABELLED.cond_score_fn(SDES["vp"])
  with pytest.raises(ValueError, match="class label"):
    guidance.classifier_free(fn, y, w=1.0, null_label=NULL)
  if not isinstance(y, float):
    with pytest.raises(ValueError, match="out of range"):
      guidance.classifier_guided(fn, LABELLED.log_prob_fn(SDES["vp"]), y if y != 4 else 3,
                                 scale=1.0, num_classes=NULL)


def test_label_batch_shape_mismatch_raises():
  fn = guidance.classifier_free(LABELLED.cond_score_fn(SDES["vp"]), jnp.zeros((3,), int),
                                w=1.0, null_label=NULL)
  with pytest.raises(ValueError, match=r"\[B\]"):
    fn(_points(8), jnp.full((8,), 0.5))


# --------------------------------------------------------------------------------------------
# Every sampler draws the exact conditional through guidance (slow, statistical)
# --------------------------------------------------------------------------------------------

METHODS = {
    "pc": ("pc", dict(predictor="reverse_diffusion", corrector="langevin", steps=200)),
    "ode": ("ode", {}),
    "ddpm": ("ddpm", dict(steps=500)),
    "ddim": ("ddim", dict(steps=100, grid="time_quadratic")),
    "heun": ("heun", dict(steps=40)),
    "dpm_solver": ("dpm_solver", dict(steps=50, order=3)),
}
N = 2000


@functools.lru_cache(maxsize=None)
def _guided_draws(sde_name, case, kind):
  """`draw(key, y, weight) -> x [N, 2]`: N draws of the sampler `case` guided by CFG
  (`kind` 'cfg', weight = w) or by the exact classifier ('classifier', weight = scale), the
  label and the weight traced: one compiled program per sampler, SDE and kind serves every
  label and weight (of both tests below)."""
  method, options = METHODS[case]
  sde = SDES[sde_name]

  @jax.jit
  def draw(key, y, weight):
    if kind == "cfg":
      score_fn = guidance.classifier_free(LABELLED.cond_score_fn(sde), y, w=weight,
                                          null_label=NULL)
    else:
      score_fn = guidance.classifier_guided(LABELLED.marginal().score_fn(sde),
                                            LABELLED.log_prob_fn(sde), y, scale=weight)
    return sampling.sample(key, score_fn, sde, (N, 2), method=method, **options)[0]

  return draw


def _draw(sde_name, case, kind, y, weight):
  return _guided_draws(sde_name, case, kind)(KEY, jnp.asarray(y, jnp.int32),
                                             jnp.asarray(weight, jnp.float32))


@pytest.mark.slow
@pytest.mark.parametrize("case,sde_name", [(c, list(SDES)[i % 3]) for i, c in
                                           enumerate(METHODS)])
def test_every_sampler_draws_the_exact_conditional_with_guidance(case, sde_name):
  """CFG w = 0 -> p(x | y); CFG w = -1 -> p(x); exact classifier at scale 1 -> p(x | y)."""
  assert_reproduces(_draw(sde_name, case, "cfg", 0, 0.0), LABELLED.classes[0])
  assert_reproduces(_draw(sde_name, case, "cfg", 2, -1.0), LABELLED.marginal())
  assert_reproduces(_draw(sde_name, case, "classifier", 2, 1.0), LABELLED.classes[2])


@pytest.mark.slow
def test_the_guided_check_can_fail():
  """Guidance that is not the exact conditional is caught: w = 1 sharpens class 0 (its mode
  weights move away from 0.6 / 0.4), and classifier guidance at scale 0 is unconditional."""
  with pytest.raises(AssertionError):
    assert_reproduces(_draw("vp", "ddim", "cfg", 0, 1.0), LABELLED.classes[0])
  with pytest.raises(AssertionError):
    assert_reproduces(_draw("vp", "ddim", "classifier", 2, 0.0), LABELLED.classes[2])


# --------------------------------------------------------------------------------------------
# Inpainting and colorization
# --------------------------------------------------------------------------------------------

IMAGES = mixtures.image_mixture((4, 4, 1))
PIXEL_MASK = np.zeros((4, 4, 1), np.float32)
PIXEL_MASK[:2] = 1.0  # the top half is known
FAST_CASES = [
    ("pc", "reimpose", dict(predictor="reverse_diffusion", corrector="langevin", steps=5)),
    ("pc", "score", dict(predictor="ancestral_sampling", steps=5)),
    ("ddpm", "score", dict(steps=5)),
    ("ddim", "score", dict(steps=5)),
    ("heun", "score", dict(steps=3)),
    ("dpm_solver", "score", dict(steps=5)),
    ("ode", "score", dict(steps=5, solver="heun")),
]


@pytest.mark.parametrize("method,scheme,options", FAST_CASES, ids=lambda v: str(v)[:20])
def test_inpainting_keeps_the_known_pixels_exactly(method, scheme, options):
  sde = SDES["vp"]

  known, _ = IMAGES.sample(jax.random.key(3), 6)
  x, _ = jax.jit(lambda key, known: guidance.inpaint(
      key, IMAGES.score_fn(sde), sde, known, PIXEL_MASK, method=method, scheme=scheme,
      **options))(KEY, known)
  assert x.shape == known.shape and np.all(np.isfinite(x))
  np.testing.assert_array_equal(np.asarray(x)[:, :2], np.asarray(known)[:, :2])
  assert not np.allclose(np.asarray(x)[:, 2:], np.asarray(known)[:, 2:])  # filled in, not copied


@pytest.mark.parametrize("method,scheme,options",
                         [("pc", "reimpose", dict(predictor="reverse_diffusion", steps=5))]
                         + FAST_CASES[1:2] + FAST_CASES[3:4], ids=lambda v: str(v)[:20])
def test_colorization_keeps_the_gray_level(method, scheme, options):
  sde = SDES["ve"]
  colour = mixtures.image_mixture((2, 2, 3), seed=1)

  images, _ = colour.sample(jax.random.key(4), 5)
  gray = jnp.mean(images, -1, keepdims=True)

  @jax.jit
  def run(key, gray):
    x, _ = guidance.colorize(key, colour.score_fn(sde), sde, gray, method=method,
                             scheme=scheme, **options)
    return x, jnp.mean(x, -1, keepdims=True), jnp.std(x - gray)

  x, x_gray, spread = run(KEY, gray)
  assert x.shape == images.shape
  np.testing.assert_allclose(x_gray, gray, atol=1e-6)
  assert float(spread) > 0.05  # actually coloured


def test_gray_basis_is_orthonormal_with_the_gray_axis_first():
  m = guidance.gray_basis(3)
  np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-12)
  np.testing.assert_allclose(m[:, 0], np.full(3, 1 / np.sqrt(3)), atol=1e-12)


def test_reimposed_pc_returns_the_noise_free_mean_in_the_unknown_pixels():
  """The reference's bug: it re-imposes the known pixels on x_mean using the noisy x for the
  unknown ones. For a point mass, the ancestral step's mean is the point itself, so a correct
  denoised output is exactly mu in the unknown pixels; the noisy sample x is not."""
  sde = SDES["vp"]
  mu = np.linspace(-0.7, 0.9, 16).reshape(4, 4, 1)
  point = mixtures.GaussianMixture(weights=(1.0,), means=(tuple(mu.reshape(-1)),),
                                   stds=(0.0,), event_shape=(4, 4, 1))
  known = jnp.broadcast_to(jnp.asarray(mu, jnp.float32), (8, 4, 4, 1))
  options = dict(method="pc", scheme="reimpose", predictor="ancestral_sampling", steps=20)

  @jax.jit  # both, one program
  def run(key):
    return [guidance.inpaint(key, point.score_fn(sde), sde, known, PIXEL_MASK,
                             denoise=denoise, **options)[0] for denoise in (True, False)]

  x, noisy = run(KEY)
  np.testing.assert_allclose(x, known, atol=1e-4)
  assert float(np.max(np.abs(np.asarray(noisy) - np.asarray(known)))) > 1e-3  # the reference's


def test_pc_step_hook_does_not_change_the_sampler_draws():
  """An identity hook leaves the samples bitwise unchanged (its draws use their own keys)."""
  sde = SDES["vp"]
  options = dict(predictor="reverse_diffusion", corrector="langevin", steps=5)

  @jax.jit  # both, one program
  def run(key):
    return [sampling.pc_sample(key, IMAGES.score_fn(sde), sde, (4, 4, 4, 1), step_hook=hook,
                               **options)[0] for hook in (None, lambda key, x, t: x)]

  plain, hooked = run(KEY)
  np.testing.assert_array_equal(plain, hooked)


def test_inpainting_bad_input_raises_before_compiling():
  sde = SDES["vp"]
  known = jnp.zeros((2, 4, 4, 1))
  score_fn = IMAGES.score_fn(sde)
  with pytest.raises(ValueError, match=r"mask of shape \(3, 3, 1\) does not match"):
    guidance.inpaint(KEY, score_fn, sde, known, np.ones((3, 3, 1)))
  with pytest.raises(ValueError, match="needs method 'pc'"):
    guidance.inpaint(KEY, score_fn, sde, known, PIXEL_MASK, method="ddim", scheme="reimpose")
  with pytest.raises(ValueError, match="Unknown inpainting scheme"):
    guidance.inpaint(KEY, score_fn, sde, known, PIXEL_MASK, scheme="magic")
  with pytest.raises(ValueError, match="x_T"):
    guidance.inpaint(KEY, score_fn, sde, known, PIXEL_MASK, x_T=known)
  with pytest.raises(ValueError, match="gray images"):
    guidance.colorize(KEY, score_fn, sde, jnp.zeros((2, 4, 4, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["inpaint", "colorize"])
def test_inpainting_bias_against_the_exact_conditional(problem):
  """The measured bias of docs/guidance.md: samples of the exact conditional (the control)
  match it within 4.5 standard errors; the replacement schemes put 4-17 points too little
  weight on the mode the known values favour (exact 0.64), for every sampler."""
  p = inpainting_bias.PROBLEMS[problem]()
  sde = SDES["vp"]
  control = inpainting_bias.exact_control(p, sde, N, jax.random.key(7))
  assert abs(control["weight_error"]) < 4.5 * control["weight_se"], control
  cases = {label: (method, scheme, options) for label, method, scheme, options
           in inpainting_bias.CASES}
  for label in ("pc reimpose, RD + Langevin", "ddim score", "ode score"):
    method, scheme, options = cases[label]
    x, _ = jax.jit(lambda key: p.run(key, p.mix.score_fn(sde), sde, N, method, scheme,
                                     options))(jax.random.key(1))
    m = inpainting_bias.measure(p, x)
    assert -0.17 < m["weight_error"] < -0.04, (label, m)
