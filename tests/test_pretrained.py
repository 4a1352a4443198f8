"""Pretrained models by name (`score_sde.run.pretrained`): a tiny model file written here,
registered, loaded back with its SHA-256 checked; a changed byte, a wrong digest, a missing
file and an unknown name fail clearly, naming the file and both digests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist_rf
from score_sde.run import compare, experiment, pretrained, programs


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  """(registry, path, the EMA variables saved): an initialized tiny RF network (8x8)."""
  config = fashion_mnist_rf.get_config("tiny")
  config.data.update(dataset="synthetic", image_size=8)
  config.model.update(ch_mult=(1,), attn_resolutions=(), nf=4)
  spec = experiment.run_spec(config)
  state = jax.jit(lambda k: programs.init_state(k, spec))(jax.random.PRNGKey(0))
  run = programs.Run(workdir="", config=config, step=3, spec=spec, state=state)
  path = str(tmp_path_factory.mktemp("assets") / "tiny_rf.npz")
  digest = pretrained.save_pretrained(run, path)
  assert digest == pretrained.sha256_of_file(path) and len(digest) == 64
  registry = {"tiny_rf": pretrained.Pretrained(path, digest, "configs/fashion_mnist_rf.py:tiny",
                                               step=3, description="initialized, untrained")}
  return registry, path, run.variables()


def test_load_by_name_gives_the_saved_network(tiny_model):
  registry, path, variables = tiny_model
  run = pretrained.load_pretrained("tiny_rf", registry=registry)
  assert run.step == 3 and run.workdir == path
  assert run.config.training.sde == "rectified_flow"
  assert run.config.model.parameterization == "velocity"
  saved = jax.tree_util.tree_leaves(variables)
  loaded = jax.tree_util.tree_leaves(run.variables())
  assert len(saved) == len(loaded)
  for a, b in zip(saved, loaded):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  t = np.full((2,), 0.5, np.float32)
  np.testing.assert_allclose(np.asarray(run.score_fn()(x, t)), np.asarray(
      run.score_model.score_fn(variables)(x, t)), rtol=1e-6)


def test_digest_is_checked_before_loading(tiny_model, tmp_path):
  registry, path, _ = tiny_model
  entry = registry["tiny_rf"]
  wrong = {"m": pretrained.Pretrained(path, "0" * 64, entry.config, step=3)}
  with pytest.raises(ValueError) as info:
    pretrained.load_pretrained("m", registry=wrong)
  assert str(info.value) == (f"pretrained model 'm': {path} has SHA-256 {entry.sha256}, "
                             f"expected {'0' * 64}: a corrupt or different file")
  # One changed byte of a copy.
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  bad = tmp_path / "bad.npz"
  bad.write_bytes(bytes(data))
  flipped = {"m": pretrained.Pretrained(str(bad), entry.sha256, entry.config, step=3)}
  with pytest.raises(ValueError, match=rf"{bad} has SHA-256 [0-9a-f]{{64}}, expected "
                                       rf"{entry.sha256}"):
    pretrained.load_pretrained("m", registry=flipped)
  missing = {"m": pretrained.Pretrained(str(tmp_path / "gone.npz"), entry.sha256, "", 3)}
  with pytest.raises(FileNotFoundError, match="gone.npz not found"):
    pretrained.load_pretrained("m", registry=missing)
  with pytest.raises(ValueError, match=r"Unknown pretrained model 'nope'; valid: \['tiny_rf'\]"):
    pretrained.load_pretrained("nope", registry=registry)


def test_compare_samplers_takes_a_model_by_name(tiny_model, monkeypatch):
  registry, _, _ = tiny_model
  with pytest.raises(ValueError, match=r"Unknown pretrained model 'tiny_rf'; valid: \["):
    compare.CompareOptions(model="tiny_rf")
  monkeypatch.setattr(pretrained, "MODELS", registry)
  options = compare.CompareOptions(problem="checkpoint", model="tiny_rf", samplers=("sde",),
                                   quality=False)
  problem = compare.build_problem(options)
  assert problem.sde.t_max == pytest.approx(0.999)
  assert problem.event_shape == (8, 8, 1)
  assert "pretrained model tiny_rf (step 3)" == problem.description
  with pytest.raises(ValueError, match="not both"):
    compare.CompareOptions(model="tiny_rf", workdir="runs/x")


@pytest.mark.parametrize("name", sorted(pretrained.MODELS))
def test_registered_models_load_and_denoise(name):
  """Every shipped model passes its digest check, restores its own config and step, and its
  score predicts the noise of a noised image far better than the zero guess (MSE 1)."""
  run = pretrained.load_pretrained(name)
  assert run.step == pretrained.MODELS[name].step
  sde = run.spec.sde
  x0 = np.full((4, 28, 28, 1), -1.0, np.float32)
  x0[:, 6:22, 9:19] = 0.6  # a plain garment-like block in the data range [-1, 1]
  t = jnp.full((4,), 0.3)
  mean, std = sde.marginal_prob(jnp.asarray(x0), t)
  std = jnp.reshape(std, (-1, 1, 1, 1))
  z = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  s = run.score_fn()(mean + std * z, t)
  err = float(jnp.mean((s * std + z) ** 2))  # eps_hat = -std * score
  assert np.isfinite(err) and err < 0.3, err
