"""The config edge of guided and controllable generation: config -> checks, guided sample
functions, inpainting / colorization of test images.

`score_sde.guidance` holds the math (pure score-function transformations); this module reads
`config.sampling.{guidance, guidance_scale, class_label}`, `config.model.num_classes` and the
classifier checkpoint, and builds the compiled programs `evaluate.sample` and
`scripts/inpaint.py` run. Every check happens before anything compiles.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from score_sde import guidance
from score_sde.checks import check_choice
from score_sde.io import datasets, files, images, parallel
from score_sde.io import workdir as workdir_lib
from score_sde.run import classifier, experiment, keys, latent, networks, programs

TASKS = ("inpaint", "colorize")
MASKS = ("left_half", "right_half", "top_half", "bottom_half", "center", "checkerboard")


def check_guidance(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`experiment.check_guidance_config`, and for classifier guidance that `workdir` holds a
  classifier trained for the config's data (before anything compiles).

  Classifier-free guidance works on a latent run as on pixels (the conditional network's
  latents, decoded); classifier guidance does not: its classifier is trained on noised pixels
  (`--mode=train_classifier`), not on the run's latents.

  Raises:
    ValueError: as `check_guidance_config`, a classifier for other data, or classifier
      guidance on a latent run.
    FileNotFoundError: classifier guidance without a trained classifier in `workdir`.
  """
  experiment.check_guidance_config(config)
  if experiment.guidance_settings(config)[0] == "classifier":
    path = latent.latent_path(config)
    if path is not None:
      raise ValueError(
          f"config.sampling.guidance='classifier' needs a pixel-space run: the classifier "
          f"(--mode=train_classifier) is trained on noised images, and this run's data are "
          f"latents (autoencoder config.data.latent={path}); use guidance='cfg' with a "
          f"class-conditional model (config.model.num_classes > 0)")
    classifier.check_checkpoint(config, workdir)


def sample_tag(config: ml_collections.ConfigDict) -> str:
  """A file-name suffix for guided samples ('' without guidance), e.g. '_cfg3.0_y7'."""
  name, scale, label = experiment.guidance_settings(config)
  return "" if name == "none" else f"_{name}{scale:g}_y{label}"


def make_guided_sample_fn(config: ml_collections.ConfigDict, workdir: str,
                          spec: experiment.RunSpec, shape: tuple[int, ...],
                          mesh: Mesh | None = None, decode: bool = True) -> Callable | None:
  """`sample_fn(variables, key) -> (images in [0, 1], nfe)` with the config's guidance, one
  compiled program (as `programs.make_sample_fn`; the same starting noise for the same key), or
  None when `config.sampling.guidance == 'none'`. `spec` is the run's `experiment.run_spec`.

  Raises:
    ValueError / FileNotFoundError: as `check_guidance`.
  """
  check_guidance(config, workdir)
  name, scale, label = experiment.guidance_settings(config)
  if name == "none":
    return None
  method, options = experiment.sampler_settings(config)
  sde, score_model = spec.sde, spec.score_model_for("sample")
  classifier_variables = None
  if name == "classifier":
    classifier_net, classifier_variables, step = classifier.load_classifier(
        config, workdir, mesh=mesh)
    logging.info("classifier guidance (scale %g) with the classifier of step %d", scale, step)

  def score_fn_of(both):
    variables, cvars = both
    if name == "cfg":
      def cond_score_fn(x, t, y):
        return score_model.score_fn(variables, class_labels=y)(x, t)
      return guidance.classifier_free(cond_score_fn, label, w=scale,
                                      null_label=int(config.model.num_classes))
    # Classifier guidance of the model's unconditional score (the null label, if the model
    # is class-conditional).
    score_fn = score_model.score_fn(variables)
    log_prob_fn = classifier.get_log_prob_fn(sde, classifier_net, cvars)
    return guidance.classifier_guided(score_fn, log_prob_fn, label, scale=scale)

  def variance_fn_of(both):
    """ddpm's learned variance: the conditional network's (as DiT's forward_with_cfg keeps
    the conditional half's variance), the unconditional one with classifier guidance."""
    variables, _ = both
    if name != "cfg":
      return score_model.variance_fn(variables)
    return lambda x, t: score_model.variance_fn(
        variables, class_labels=jnp.full(x.shape[:1], label, jnp.int32))(x, t)

  sample_fn = programs.make_sample_fn(spec, shape, method, options, mesh=mesh,
                                   score_fn_of=score_fn_of, variance_fn_of=variance_fn_of,
                                   decode=decode)
  return lambda variables, key: sample_fn((variables, classifier_variables), key)


# --------------------------------------------------------------------------------------------
# Inpainting and colorization of test images
# --------------------------------------------------------------------------------------------


def make_mask(name: str, image_shape: tuple[int, int, int]) -> np.ndarray:
  """A `[H, W, 1]` float mask, 1 = known, by name (see `MASKS`).

  Raises:
    ValueError: unknown name.
  """
  h, w, _ = image_shape
  mask = np.ones((h, w, 1), np.float32)
  if name == "left_half":  # the left half is known; fill in the right
    mask[:, w // 2:] = 0
  elif name == "right_half":
    mask[:, :w // 2] = 0
  elif name == "top_half":
    mask[h // 2:] = 0
  elif name == "bottom_half":
    mask[:h // 2] = 0
  elif name == "center":
    mask[h // 4: h - h // 4, w // 4: w - w // 4] = 0
  elif name == "checkerboard":
    mask[(np.add.outer(np.arange(h) // 4, np.arange(w) // 4) % 2) == 1] = 0
  else:
    check_choice("mask", name, MASKS, hint="or a .npy file")
  return mask


def load_mask(spec: str, image_shape: tuple[int, int, int]) -> np.ndarray:
  """A named mask (`MASKS`) or a `.npy` file of 0/1 values broadcastable to `[H, W, C]`.

  Raises:
    FileNotFoundError: a missing file. ValueError: a mask of another shape, or not 0/1.
  """
  if not spec.endswith(".npy"):
    return make_mask(spec, image_shape)
  if not os.path.exists(spec):
    raise FileNotFoundError(f"No mask file {spec}")
  try:
    mask = np.load(spec, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:  # not a .npy file, cut short, or pickled
    raise ValueError(f"mask file {spec} is not a readable .npy array ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:120]}); save one with numpy.save") from None
  if not isinstance(mask, np.ndarray) or mask.dtype.kind not in "biuf":
    raise ValueError(f"mask in {spec} must be a numeric array of 0 and 1, got dtype "
                     f"{getattr(mask, 'dtype', type(mask).__name__)}")
  mask = mask.astype(np.float32)
  try:
    np.broadcast_shapes(mask.shape, tuple(image_shape))
  except ValueError:
    raise ValueError(f"mask of shape {mask.shape} in {spec} does not match the images of "
                     f"shape {tuple(image_shape)} (it must broadcast to [H, W, C])") from None
  if mask.ndim > 3 or not np.all((mask == 0) | (mask == 1)):
    raise ValueError(f"mask in {spec} must hold only 0 (unknown) and 1 (known), at most "
                     f"[H, W, C]; got shape {mask.shape}")
  return mask


def complete_test_images(config: ml_collections.ConfigDict, workdir: str, task: str, *,
                         mask: str = "right_half", num_images: int = 16,
                         scheme: str | None = None, step: int | None = None,
                         mesh: Mesh | None = None) -> dict:
  """Inpaints or colorizes the first `num_images` test images with checkpoint `step`.

  Writes `workdir/<task>/<mask or gray>_step_<k>.{npz,png}`: the png shows three rows
  (originals, inputs with the unknown part grey / the gray-scale input, completions);
  the npz holds `original`, `completed` (both [N, H, W, C] in [0, 1]) and `mask`.

  Returns:
    dict(npz, png, nfe, step, known_error = max |completed - original| on the known part
    (inpainting; 0 up to rounding)).

  Raises:
    ValueError / FileNotFoundError: unknown task / mask, a mask of another shape, colorizing
      one-channel images, a latent run, a missing checkpoint (all before compiling).
  """
  if task not in TASKS:
    raise ValueError(f"Unknown task {task!r}; valid: {TASKS}")
  path = latent.latent_path(config)
  if path is not None:
    # The known pixels constrain the sampler's state in data space; a latent run samples
    # latents, whose entries are not pixels (no mask of latent entries keeps them).
    raise ValueError(f"{'inpainting' if task == 'inpaint' else 'colorization'} needs a "
                     f"pixel-space run; this run's data are latent (autoencoder "
                     f"config.data.latent={path})")
  shape = networks.image_shape(config)
  if task == "colorize" and shape[-1] != 3:
    raise ValueError(f"colorize needs RGB images, config.data.num_channels="
                     f"{shape[-1]}")
  mask_array = load_mask(mask, shape) if task == "inpaint" else None
  mesh = parallel.make_mesh() if mesh is None else mesh
  experiment.check_config(config, mesh)
  check_guidance(config, workdir)
  loaded = programs.restore_run(config, workdir, step, mesh)
  state, step, sde = loaded.state, loaded.step, loaded.spec.sde
  score_model = loaded.score_model
  data = experiment.make_dataset(config, "test", batch_size=num_images)
  original = data.batch(0)["image"][:num_images]
  scaler = datasets.get_data_scaler(config.data.centered)
  inverse_scaler = datasets.get_data_inverse_scaler(config.data.centered)
  method, options = experiment.sampler_settings(config)

  @jax.jit
  def run(variables, key, x01):
    score_fn = score_model.score_fn(variables)
    if task == "inpaint":
      x, nfe = guidance.inpaint(key, score_fn, sde, scaler(x01), mask_array, method=method,
                                scheme=scheme, **options)
    else:
      x, nfe = guidance.colorize(key, score_fn, sde, scaler(x01), method=method,
                                 scheme=scheme, **options)
    return jnp.clip(inverse_scaler(x), 0.0, 1.0), nfe

  _, _, sample_key, _ = experiment.run_keys(config)
  completed, nfe = run(state.variables(ema=True), jax.random.fold_in(sample_key, keys.COMPLETION),
                       jnp.asarray(original))
  completed = np.asarray(completed)
  if task == "inpaint":
    shown = original * mask_array + 0.5 * (1 - mask_array)
    known_error = float(np.max(np.abs((completed - original) * mask_array)))
    tag = os.path.basename(mask).removesuffix(".npy")
  else:
    shown = np.broadcast_to(original.mean(-1, keepdims=True), original.shape)
    known_error = float(np.max(np.abs(completed.mean(-1) - original.mean(-1))))
    tag = "gray"
  out_dir = os.path.join(workdir, task)
  os.makedirs(out_dir, exist_ok=True)
  stem = workdir_lib.fresh_stem(out_dir, f"{tag}_step_{step}", (".npz", ".png"))
  files.save_npz(stem + ".npz", original=original, completed=completed,
                 mask=mask_array if mask_array is not None else np.zeros(0))
  images.save_grid(np.concatenate([original, shown, completed]), stem + ".png",
                   nrow=len(original), scale=2)
  return dict(npz=stem + ".npz", png=stem + ".png", nfe=int(nfe), step=step,
              known_error=known_error)
