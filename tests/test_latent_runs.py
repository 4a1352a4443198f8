"""A latent run written on 2 devices: restoring it elsewhere, the sampler panel's latent
branch, and guidance / inpainting on latents.

One module fixture, built without training: the reference autoencoder
(`shared/fixtures/autoencoder_kl/vae_tiny_1ch`, 16x16x1 -> 8x8x4) saved as a phase-1 workdir
whose arrays are replicated over the 2 simulated devices (as `--mode=train_autoencoder`
writes them), and a class-conditional one-resolution tiny DDPM++ on its latents ('auto'
scale, perturbed random weights) saved the same way. Both checkpoints' sharding records are
then rewritten to name device ids this machine does not have (0 and 9): they read as
checkpoints written on another machine.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import score_sde.run
from configs import default as default_config
from score_sde.io import checkpoints, parallel
from score_sde.io import workdir as workdir_lib
from score_sde.run import autoencoder as autoencoder_run
from score_sde.run import evaluate, experiment, figures, guided, latent, programs

from test_autoencoder import CASE, fixture_path

ABSENT_DEVICE = 9  # a device id the 2 simulated CPU devices do not have


def _config(ae_workdir):
  config = default_config.get_config("tiny")
  config.data.update(dataset="synthetic", image_size=16, num_channels=1, centered=True,
                     random_flip=False, latent=str(ae_workdir))
  # One resolution, no attention: what these tests check (restoring, decoding, guidance on
  # latents) does not depend on the U-Net's shape, and its programs compile several times
  # faster (the initialization of the two-resolution network with attention took 26 s).
  config.model.update(ch_mult=(1,), attn_resolutions=(), num_classes=2)
  config.sampling.update(method="ddim", steps=3, batch_size=2)
  return config


def _as_if_written_elsewhere(directory, step):
  """Rewrites the device ids of checkpoint `step`'s sharding record: device 1 becomes
  `ABSENT_DEVICE`, as a checkpoint saved on a machine with other devices reads here."""
  path = os.path.join(checkpoints.checkpoint_dir(directory), str(step), "default", "_sharding")
  with open(path) as f:
    table = json.load(f)
  changed = 0
  for name, text in table.items():
    entry = json.loads(text)
    for device in entry.get("device_mesh", {}).get("mesh", []):
      if device["id"] == 1:
        device["id"], changed = ABSENT_DEVICE, changed + 1
    table[name] = json.dumps(entry)
  assert changed, "no 2-device sharding in the record"
  with open(path, "w") as f:
    json.dump(table, f)


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
  """`(run workdir, autoencoder workdir, config)`; see the module docstring."""
  root = tmp_path_factory.mktemp("latent_2dev")
  mesh = parallel.make_mesh()
  assert mesh.size == 2
  replicated = NamedSharding(mesh, P())
  reference = score_sde.run.load_autoencoder(fixture_path(CASE))
  ae_dir = autoencoder_run.autoencoder_dir(root / "ae")
  params = jax.device_put(reference.params, replicated)
  with checkpoints.get_manager(ae_dir, keep=1) as manager:
    checkpoints.save(manager, 3, {"step": jax.device_put(jnp.int32(3), replicated),
                                  "params": params, "ema_params": params})
    manager.wait_until_finished()
  autoencoder_run.write_record(ae_dir, reference.module, source="test: 2 devices")

  config = _config(root / "ae")
  workdir = root / "run"
  space = latent.latent_space(config, str(workdir), mesh=mesh, create=True)
  spec = experiment.run_spec(config, space)

  def perturbed(key):  # nonzero outputs that depend on the label (the last layer inits to 0)
    state = programs.init_state(key, spec)
    leaves, tree = jax.tree_util.tree_flatten(state.ema_params)
    noise = [0.05 * jax.random.normal(k, a.shape, a.dtype)
             for k, a in zip(jax.random.split(key, len(leaves)), leaves)]
    return state.replace(ema_params=jax.tree_util.tree_unflatten(
        tree, [a + n for a, n in zip(leaves, noise)]))

  state = jax.jit(perturbed, out_shardings=replicated)(jax.random.PRNGKey(0))
  with checkpoints.get_manager(workdir, keep=1) as manager:
    checkpoints.save(manager, 1, state)
    manager.wait_until_finished()
  workdir_lib.save_config(experiment.config_to_plain(config), str(workdir))
  _as_if_written_elsewhere(ae_dir, 3)
  _as_if_written_elsewhere(str(workdir), 1)
  return workdir, root / "ae", config


def _decoded(z, workdir, ae_workdir):
  """Images in [0, 1] of scaled latents `z`, decoded by the reference autoencoder (its own
  jitted decoder, not the run's) with the run's stored scale."""
  record = json.loads((workdir / latent.LATENT_FILE).read_text())
  assert record["shift_factor"] == 0.0
  ae = score_sde.run.load_autoencoder(ae_workdir)
  x = np.asarray(ae.decode(jnp.asarray(z) / record["scaling_factor"]))
  return np.clip((x + 1) / 2, 0, 1)


def test_latent_run_restores_on_other_devices(latent_run):
  """Checkpoints written with a 2-device sharding (here: naming a device this machine lacks)
  restore on a 1-device mesh: the run's state and its autoencoder's weights all land on that
  device (the autoencoder was restored with its saved sharding before: orbax's 'Topology
  mismatch')."""
  workdir, ae_workdir, _ = latent_run
  ae_dir = autoencoder_run.autoencoder_dir(ae_workdir)
  with checkpoints.get_manager(ae_dir, read_only=True) as manager:  # the precondition
    with pytest.raises(ValueError, match=r"Topology mismatch"):
      manager.restore(3, args=ocp.args.StandardRestore())
  device = jax.devices()[0]
  one = parallel.make_mesh([device])
  run = score_sde.run.load_run(str(workdir), mesh=one)
  assert run.step == 1 and run.spec.latent.autoencoder.step == 3
  leaves = jax.tree_util.tree_leaves(run.state) + jax.tree_util.tree_leaves(
      run.spec.latent.params)
  assert {d for leaf in leaves for d in leaf.sharding.device_set} == {device}
  reference = score_sde.run.load_autoencoder(fixture_path(CASE))
  jax.tree_util.tree_map(np.testing.assert_array_equal, run.spec.latent.params,
                         reference.params)
  # Without a mesh: on the first local device; with the 2-device mesh: replicated there.
  ae = score_sde.run.load_autoencoder(ae_workdir)
  assert {d for a in jax.tree_util.tree_leaves(ae.params) for d in a.sharding.device_set} == {
      device}
  both = score_sde.run.load_autoencoder(ae_workdir, mesh=parallel.make_mesh())
  assert all(a.sharding.is_equivalent_to(NamedSharding(parallel.make_mesh(), P()), a.ndim)
             for a in jax.tree_util.tree_leaves(both.params))


def test_sampler_panel_of_a_latent_run_is_decoded_pixels(latent_run, monkeypatch):
  """`figures.sampler_panel` on a latent run: each method's images are the reference
  decoder's images of the latents the sampler drew (caught on their way to the run's
  decoder), and the statistics are those of these pixels and of the pixel test images."""
  workdir, ae_workdir, config = latent_run
  run = score_sde.run.load_run(str(workdir))
  caught = []
  make_decode_fn = latent.LatentSpace.make_decode_fn

  def spying(self, mesh=None):
    decode = make_decode_fn(self, mesh)
    return lambda z: (caught.append(np.asarray(parallel.to_host(z))), decode(z))[1]

  monkeypatch.setattr(latent.LatentSpace, "make_decode_fn", spying)
  samples, stats, data_stats = figures.sampler_panel(run, ["ddim"], num_samples=2)
  (z,) = caught
  assert z.shape == (2, 8, 8, 4) and np.all(np.isfinite(z))
  assert samples["ddim"].shape == (2, 16, 16, 1)
  np.testing.assert_allclose(samples["ddim"], _decoded(z, workdir, ae_workdir), atol=1e-5)
  assert np.std(samples["ddim"]) > 1e-3
  assert stats["methods"]["ddim"]["mean"] == pytest.approx(float(np.mean(samples["ddim"])))
  test = experiment.make_dataset(config, "test", batch_size=1)
  images = np.asarray(next(experiment.make_dataset(
      config, "test", batch_size=min(256, test.num_examples)).iterate_once())["image"])
  assert images.shape[1:] == (16, 16, 1)
  assert data_stats["mean"] == pytest.approx(float(np.mean(images)))
  assert data_stats["std"] == pytest.approx(float(np.std(images)))


def test_cfg_on_a_latent_run(latent_run):
  """Classifier-free guidance samples latents with the conditional network and decodes them:
  the saved images are the reference decoder's images of the saved latents, and another
  class label gives other latents from the same noise."""
  workdir, ae_workdir, config = latent_run
  results = {}
  for label in (0, 1):
    guided_config = config.copy_and_resolve_references()
    guided_config.sampling.update(guidance="cfg", guidance_scale=2.0, class_label=label)
    results[label] = evaluate.sample(guided_config, str(workdir), num_samples=2,
                                     progress=False)
  assert "cfg2_y1" in results[1]["npz"]
  saved = {label: np.load(r["npz"]) for label, r in results.items()}
  for label in (0, 1):
    images, z = saved[label]["samples"], saved[label]["latents"]
    assert images.shape == (2, 16, 16, 1) and z.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(images, _decoded(z, workdir, ae_workdir), atol=1e-5)
  assert np.max(np.abs(saved[0]["latents"] - saved[1]["latents"])) > 1e-3


def test_classifier_guidance_and_inpainting_refuse_a_latent_run(latent_run, monkeypatch):
  """Classifier guidance, inpainting and colorization need the run's data to be pixels: one
  clear error naming the autoencoder, before anything restores or compiles."""
  workdir, ae_workdir, config = latent_run

  def no_restore(*args, **kwargs):
    raise AssertionError("restored before refusing")

  monkeypatch.setattr(programs, "restore_run", no_restore)
  classifier_config = config.copy_and_resolve_references()
  classifier_config.sampling.update(guidance="classifier", guidance_scale=1.0, class_label=1)
  classifier_config.classifier.num_classes = 2
  with pytest.raises(ValueError, match=r"guidance='classifier' needs a pixel-space run: .*"
                     r"latents \(autoencoder config\.data\.latent=.*ae\)"):
    evaluate.sample(classifier_config, str(workdir), num_samples=2, progress=False)
  for task, what in (("inpaint", "inpainting"), ("colorize", "colorization")):
    with pytest.raises(ValueError, match=rf"^{what} needs a pixel-space run; this run's data "
                       rf"are latent \(autoencoder config\.data\.latent=.*ae\)$"):
      guided.complete_test_images(config, str(workdir), task, num_images=2)
