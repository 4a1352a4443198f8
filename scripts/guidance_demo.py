"""Guidance results of a trained class-conditional model: per-class grids at several CFG
weights, an inpainting grid of test images, and the class accuracy of guided samples against
the guidance weight (as judged by a classifier), with a plot.

    python -m score_sde.main --config=configs/fashion_mnist_cond.py --workdir=runs/fmnist_cond
    python scripts/guidance_demo.py --config=configs/fashion_mnist_cond.py \\
        --workdir=runs/fmnist_cond --out=docs/guidance

Writes into `--out`: `cfg_grid.png` (one panel per weight in `--grid_weights`, one row per
class), `inpaint.png` (originals / masked inputs / completions), `accuracy.json` and
`accuracy.png` (accuracy of `--acc_samples` samples per weight, classes cycled). The judge
(`--judge`): 'fmnist' is the Fashion-MNIST classifier of the metrics work
(`score_sde.models.features.get_feature_net('fmnist')`); 'noise_classifier' is this run's
noise-conditional classifier (`--mode=train_classifier`) at the smallest time; 'none' skips
the accuracy. Sampling uses `config.sampling` (method and options); every sample of one
weight comes from one compiled program, whose labels and weight are inputs (one compile for
all weights and classes).
"""

from __future__ import annotations

import json
import os
import shutil
import time

from absl import app, flags
from ml_collections import config_flags

import common  # noqa: E402,F401  scripts/common.py: the repository root on sys.path

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The conditional experiment's config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory (checkpoints are read).")
flags.DEFINE_string("out", "docs/guidance", "Output directory.")
flags.DEFINE_list("grid_weights", ["0", "1", "3"], "CFG weights w of the per-class grids.")
flags.DEFINE_integer("per_class", 8, "Samples per class in the grids.")
flags.DEFINE_list("acc_weights", ["-1", "0", "0.5", "1", "2", "3", "5"],
                  "CFG weights of the accuracy curve (-1: unconditional).")
flags.DEFINE_integer("acc_samples", 200, "Samples per weight for the accuracy.")
flags.DEFINE_enum("judge", "fmnist", ["fmnist", "noise_classifier", "none"],
                  "Who judges the class of a sample.")
flags.DEFINE_string("mask", "right_half", "Mask of the inpainting grid (see scripts/inpaint.py).")
flags.mark_flags_as_required(["config", "workdir"])


def make_sampler(config, spec):
  """`sample(variables, key, labels [B], w) -> images [B, H, W, C] in [0, 1]`, jitted once."""
  import jax
  import jax.numpy as jnp

  from score_sde.run import experiment
  from score_sde import guidance, models, sampling

  method, options = experiment.sampler_settings(config)
  null_label = int(config.model.num_classes)

  @jax.jit
  def sample(variables, key, labels, w):
    def cond_score_fn(x, t, y):
      return models.get_score_fn(spec.sde, spec.network("sample"), variables, train=False,
                                 continuous=spec.continuous, class_labels=y)(x, t)

    score_fn = guidance.classifier_free(cond_score_fn, labels, w=w, null_label=null_label)
    shape = (labels.shape[0], *models.image_shape(config))
    x, _ = sampling.sample(key, score_fn, spec.sde, shape, method=method, **options)
    return jnp.clip(spec.inverse_scaler(x), 0.0, 1.0)

  return sample


def make_judge(config, workdir: str, name: str):
  """`judge(images [N, H, W, C] in [0, 1]) -> predicted classes [N]`, or None."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  if name == "none":
    return None
  if name == "fmnist":
    from score_sde.models import features
    net = features.get_feature_net("fmnist")
    return lambda images: np.argmax(net(images)[1], axis=-1)
  from score_sde.run import classifier as classifier_training, experiment
  from score_sde.io import datasets
  model, variables, _ = classifier_training.load_classifier(config, workdir)
  sde = experiment.make_sde(config)
  scaler = datasets.get_data_scaler(config.data.centered)
  t_min = float(config.classifier.eps)

  @jax.jit
  def logits(images):
    return classifier_training.classifier_logits(
        sde, model, variables, scaler(images), jnp.full(images.shape[:1], t_min))

  return lambda images: np.asarray(jnp.argmax(logits(jnp.asarray(images)), -1))


def main(argv) -> None:
  del argv
  from score_sde.io import logs
  logs.setup_logging()
  import jax
  import numpy as np

  from score_sde.run import guided as controllable, evaluate, experiment
  from score_sde.io import images

  config, workdir = FLAGS.config, FLAGS.workdir
  os.makedirs(FLAGS.out, exist_ok=True)
  num_classes = int(config.model.num_classes)
  if num_classes < 1:
    raise SystemExit(f"error: {FLAGS.config} is not class-conditional (model.num_classes=0)")
  experiment.check_config(config)
  judge = make_judge(config, workdir, FLAGS.judge)  # fails early when the judge is missing
  state, step, _, _ = evaluate.load_checkpoint(config, workdir)
  spec = experiment.run_spec(config)
  variables = state.variables(ema=True)
  sample = make_sampler(config, spec)
  key = jax.random.key(int(config.seed))
  result = dict(step=step, method=config.sampling.method, judge=FLAGS.judge)

  # Per-class grids: the same starting noise for every weight (same key).
  labels = np.repeat(np.arange(num_classes), FLAGS.per_class).astype(np.int32)
  panels = {}
  for w in FLAGS.grid_weights:
    start = time.perf_counter()
    panels[f"w = {w}"] = np.asarray(sample(variables, key, labels, float(w)))
    print(f"grid w={w}: {len(labels)} samples in {time.perf_counter() - start:.1f} s",
          flush=True)
  grid_path = os.path.join(FLAGS.out, "cfg_grid.png")
  images.save_side_by_side(panels, grid_path, nrow=FLAGS.per_class)
  result["grid"] = grid_path

  # Inpainting of test images (guidance off: the unconditional score, i.e. the null label).
  plain = config.copy_and_resolve_references()
  with plain.unlocked():
    plain.sampling.guidance = "none"
  inpainted = controllable.complete_test_images(plain, workdir, "inpaint", mask=FLAGS.mask,
                                                num_images=16)
  shutil.copy(inpainted["png"], os.path.join(FLAGS.out, "inpaint.png"))
  result["inpaint"] = dict(png=os.path.join(FLAGS.out, "inpaint.png"), nfe=inpainted["nfe"],
                           known_error=inpainted["known_error"])

  # Accuracy against the guidance weight.
  if judge is not None:
    labels = (np.arange(FLAGS.acc_samples) % num_classes).astype(np.int32)
    accuracy = {}
    for i, w in enumerate(FLAGS.acc_weights):
      x = np.asarray(sample(variables, jax.random.fold_in(key, 1 + i), labels, float(w)))
      accuracy[w] = float(np.mean(judge(x) == labels))
      print(f"accuracy at w={w}: {accuracy[w]:.3f}", flush=True)
    result["accuracy"] = accuracy
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([float(w) for w in accuracy], list(accuracy.values()), "o-")
    ax.set_xlabel("guidance weight w  (-1: unconditional, 0: conditional)")
    ax.set_ylabel(f"class accuracy ({FLAGS.judge} judge)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.out, "accuracy.png"), dpi=120)
  with open(os.path.join(FLAGS.out, "accuracy.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
