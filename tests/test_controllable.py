"""Conditional training (label dropout), the noise-conditional classifier and its training
mode, guided sampling and inpainting from the command line's functions, and their bad-input
errors; on a tiny network and synthetic data (as tests/test_train.py)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde.run import classifier as classifier_training, guided as controllable, evaluate, experiment, train
from score_sde import guidance
from score_sde import main as main_lib
from score_sde import sde as sde_lib
from score_sde.models.classifier import NoiseConditionalClassifier
from tests.test_train import tiny_config

# A one-resolution classifier, as the score network of tiny_config (its training, guidance
# and checkpoint plumbing do not depend on the depth; test_classifier_shapes_and_log_probs
# builds a two-resolution one).
CLASSIFIER_TINY = {"classifier.nf": 8, "classifier.ch_mult": (1,), "classifier.batch_size": 4,
                   "classifier.n_iters": 2, "classifier.snapshot_freq": 2}


def cond_config(**overrides):
  return tiny_config(**{"model.num_classes": 10, "training.label_dropout": 0.5,
                        "training.n_iters": 2, "training.snapshot_freq": 2,
                        "training.snapshot_freq_for_preemption": 2,
                        "training.snapshot_sampling": False, **CLASSIFIER_TINY,
                        **overrides})


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
  """A tiny class-conditional run with label dropout, and a classifier in the same workdir."""
  workdir = str(tmp_path_factory.mktemp("cond"))
  config = cond_config()
  train.train(config, workdir, progress=False)
  classifier_training.train_classifier(config, workdir)
  return workdir


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def test_drop_labels_replaces_the_given_fraction_with_the_null_label():
  labels = jnp.arange(20_000) % 10
  dropped = guidance.drop_labels(jax.random.key(0), labels, 0.2, 10)
  is_null = np.asarray(dropped == 10)
  assert abs(is_null.mean() - 0.2) < 4.5 * np.sqrt(0.2 * 0.8 / 20_000)
  np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])


def test_classifier_shapes_and_log_probs():
  sde = sde_lib.VPSDE()
  model = NoiseConditionalClassifier(num_classes=5, nf=8, ch_mult=(1, 2))
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  # Init and the checks' computations are one compiled program each (eager, a network's
  # init and apply compile one program per operation).
  variables = jax.jit(model.init)(jax.random.key(1), x, jnp.zeros(3))
  t = jnp.asarray([0.1, 0.5, 0.9])

  @jax.jit
  def log_probs_and_guided_score(variables, x, t):
    log_prob_fn = classifier_training.get_log_prob_fn(sde, model, variables)
    all_classes = jnp.stack([log_prob_fn(x, t, jnp.full((3,), y)) for y in range(5)], -1)
    guided = guidance.classifier_guided(lambda x, t: -x, log_prob_fn, 2, scale=1.0)
    return all_classes, guided(x, t)

  all_classes, guided = log_probs_and_guided_score(variables, x, t)
  assert all_classes.shape == (3, 5)
  np.testing.assert_allclose(np.exp(np.asarray(all_classes)).sum(-1), 1.0, rtol=1e-5)
  # Usable for classifier guidance: a finite gradient, shaped like x.
  assert guided.shape == x.shape and np.all(np.isfinite(guided))


@pytest.mark.slow
def test_classifier_train_step_learns_noisy_labels():
  """On two constant images (label = which one), after 40 steps the classifier tells them
  apart at a moderate noise level (t = 0.3), where it started at chance."""
  config = cond_config(**{"classifier.lr": 3e-3, "classifier.warmup": 1})
  config.classifier.num_classes = 2
  sde = experiment.make_sde(config)
  model = classifier_training.get_classifier(config)
  optimizer = classifier_training.get_optimizer(config)
  state = jax.jit(lambda key: classifier_training.init_state(key, config, model, optimizer))(
      jax.random.key(0))
  step_fn = classifier_training.make_train_step(sde, model, optimizer, eps=1e-3,
                                                scaler=lambda x: 2 * x - 1)
  labels = jnp.arange(8) % 2
  batch = {"image": jnp.broadcast_to(labels[:, None, None, None] * 0.8 + 0.1, (8, 8, 8, 1)),
           "label": labels}
  x_t = sde.marginal_prob(2 * batch["image"] - 1, jnp.full((8,), 0.3))[0]
  x_t = x_t + sde.sigma(0.3) * jax.random.normal(jax.random.key(2), x_t.shape)

  @jax.jit
  def mean_log_prob_program(params):
    log_prob_fn = classifier_training.get_log_prob_fn(sde, model, {"params": params})
    return jnp.mean(log_prob_fn(x_t, jnp.full((8,), 0.3), labels))

  mean_log_prob = lambda params: float(mean_log_prob_program(params))

  assert mean_log_prob(state.params) < np.log(0.6)
  for _ in range(40):
    state, _ = step_fn(state, jax.random.key(1), batch)
  assert mean_log_prob(state.params) > np.log(0.9)


# --------------------------------------------------------------------------------------------
# Runs: conditional training, classifier training, guided sampling, inpainting
# --------------------------------------------------------------------------------------------


def test_classifier_mode_writes_checkpoint_and_meta(cond_run):
  meta = json.load(open(os.path.join(cond_run, "classifier", "meta.json")))
  assert meta["dataset"] == "synthetic" and meta["num_classes"] == 10
  model, variables, step = classifier_training.load_classifier(cond_config(), cond_run)
  assert step == 2 and "params" in variables


@pytest.mark.parametrize("guide,scale", [("cfg", 2.0), ("classifier", 1.0), ("none", 0.0)])
def test_guided_sampling_from_a_checkpoint(cond_run, guide, scale):
  config = cond_config(**{"sampling.guidance": guide, "sampling.guidance_scale": scale,
                          "sampling.class_label": 3, "sampling.method": "ddim"})
  result = evaluate.sample(config, cond_run, num_samples=2, progress=False)
  samples = np.load(result["npz"])["samples"]
  assert samples.shape == (2, 8, 8, 1) and np.all(np.isfinite(samples))
  assert result["nfe"] == 4  # 3 steps + denoising; CFG's two scores are one call
  assert os.path.basename(result["npz"]).startswith(
      "ddim" + ("" if guide == "none" else f"_{guide}{scale:g}_y3"))


def test_inpainting_test_images_keeps_the_known_pixels(cond_run):
  config = cond_config(**{"sampling.method": "pc", "sampling.guidance": "none"})
  result = controllable.complete_test_images(config, cond_run, "inpaint", mask="left_half",
                                             num_images=2)
  assert result["known_error"] < 1e-6
  data = np.load(result["npz"])
  assert data["completed"].shape == (2, 8, 8, 1) and os.path.exists(result["png"])


# --------------------------------------------------------------------------------------------
# Bad input: clear errors before anything compiles
# --------------------------------------------------------------------------------------------


def test_guidance_bad_input_raises(cond_run, tmp_path):
  def sample(workdir=cond_run, **overrides):
    return evaluate.sample(cond_config(**overrides), workdir, num_samples=2, progress=False)

  with pytest.raises(ValueError, match="class_label .*11.* out of range"):
    sample(**{"sampling.guidance": "cfg", "sampling.class_label": 11})
  with pytest.raises(ValueError, match="class_label .*10.* out of range"):  # null: CFG only
    sample(**{"sampling.guidance": "classifier", "sampling.class_label": 10})
  with pytest.raises(ValueError, match="needs a class-conditional model"):
    experiment.check_guidance_config(
        cond_config(**{"model.num_classes": 0, "training.label_dropout": 0.0,
                       "sampling.guidance": "cfg"}))
  with pytest.raises(ValueError, match="Unknown config.sampling.guidance 'magic'"):
    sample(**{"sampling.guidance": "magic"})
  with pytest.raises(FileNotFoundError, match="No classifier"):
    controllable.check_guidance(cond_config(**{"sampling.guidance": "classifier"}),
                                str(tmp_path))
  with pytest.raises(ValueError, match="needs a class-conditional model"):
    experiment.check_config(cond_config(**{"model.num_classes": 0}))
  with pytest.raises(ValueError, match="label_dropout must lie in"):
    experiment.check_config(cond_config(**{"training.label_dropout": 1.0}))


def test_classifier_for_another_dataset_raises(cond_run):
  config = cond_config(**{"data.dataset": "fashion_mnist", "data.image_size": 28,
                          "sampling.guidance": "classifier"})
  with pytest.raises(ValueError, match="dataset: checkpoint 'synthetic' vs config "
                                       "'fashion_mnist'"):
    controllable.check_guidance(config, cond_run)
  with pytest.raises(ValueError, match="trained for other data"):
    classifier_training.train_classifier(config, cond_run)


def test_inpainting_bad_input_raises(cond_run, tmp_path):
  config = cond_config(**{"sampling.method": "pc"})
  bad = tmp_path / "mask.npy"
  np.save(bad, np.ones((5, 5, 1)))
  with pytest.raises(ValueError, match=r"mask of shape \(5, 5, 1\)"):
    controllable.complete_test_images(config, cond_run, "inpaint", mask=str(bad))
  with pytest.raises(ValueError, match="Unknown mask 'round'"):
    controllable.complete_test_images(config, cond_run, "inpaint", mask="round")
  with pytest.raises(ValueError, match="colorize needs RGB"):
    controllable.complete_test_images(config, cond_run, "colorize")
  with pytest.raises(ValueError, match="Unknown --mode"):
    main_lib.run(config, cond_run, "paint")
