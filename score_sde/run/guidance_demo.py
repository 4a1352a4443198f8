"""Guidance results of a trained class-conditional run (`scripts/guidance_demo.py`):
classifier-free guided samples at any weight from one compiled program, a judge of the class
of a sample, and the accuracy-vs-weight plot.

    run = programs.load_run("runs/fmnist_cond")
    sample = cfg_sampler(run)                       # sample(key, labels [B], w) -> images
    judge = class_judge(run, "fmnist")              # judge(images) -> classes [N]
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import guidance, sampling
from score_sde.checks import check_choice
from score_sde.models import features
from score_sde.io import images
from score_sde.run import classifier, experiment, guided, programs

JUDGES = ("fmnist", "noise_classifier", "none")


def cfg_sampler(run: programs.Run) -> Callable:
  """`sample(key, labels [B] int32, w) -> images [B, H, W, C] in [0, 1]`: classifier-free
  guidance at weight w (-1: unconditional, 0: conditional) with `config.sampling`'s method
  and options, jitted once (labels and w are inputs).

  Raises:
    ValueError: the run is not class-conditional (`model.num_classes = 0`).
  """
  num_classes = run.spec.num_classes
  if num_classes < 1:
    raise ValueError(f"{run.workdir} is not class-conditional (model.num_classes=0)")
  method, options = experiment.sampler_settings(run.config)
  score_model, variables, spec = run.score_model, run.variables(), run.spec

  @jax.jit
  def sample(key, labels, w):
    def cond_score_fn(x, t, y):
      return score_model.score_fn(variables, class_labels=y)(x, t)

    score_fn = guidance.classifier_free(cond_score_fn, labels, w=w, null_label=num_classes)
    x, _ = sampling.sample(key, score_fn, spec.sde, (labels.shape[0], *spec.image_shape),
                           method=method, **options)
    return jnp.clip(spec.inverse_scaler(x), 0.0, 1.0)

  return sample


def class_judge(run: programs.Run, name: str) -> Callable | None:
  """`judge(images [N, H, W, C] in [0, 1]) -> predicted classes [N]`, or None for 'none'.

  'fmnist': the shipped Fashion-MNIST classifier (`features.get_feature_net('fmnist')`);
  'noise_classifier': the run's noise-conditional classifier (`--mode=train_classifier`) at
  its smallest time `config.classifier.eps`.

  Raises:
    ValueError: an unknown judge; FileNotFoundError: no classifier checkpoint.
  """
  check_choice("judge", name, JUDGES)
  if name == "none":
    return None
  if name == "fmnist":
    net = features.get_feature_net("fmnist")
    return lambda images: np.argmax(net(images)[1], axis=-1)
  model, variables, _ = classifier.load_classifier(run.config, run.workdir)
  sde, scaler = run.spec.sde, run.spec.scaler
  t_min = float(run.config.classifier.eps)

  @jax.jit
  def logits(images):
    return classifier.classifier_logits(sde, model, variables, scaler(images),
                                        jnp.full(images.shape[:1], t_min))

  return lambda images: np.asarray(jnp.argmax(logits(jnp.asarray(images)), -1))


def plot_accuracy(accuracy: dict[str, float], judge: str, path: str) -> str:
  """Accuracy against the guidance weight (keys: weights as text) as a PNG. Returns path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  ax.plot([float(w) for w in accuracy], list(accuracy.values()), "o-")
  ax.set_xlabel("guidance weight w  (-1: unconditional, 0: conditional)")
  ax.set_ylabel(f"class accuracy ({judge} judge)")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def guidance_report(run: programs.Run, out: str, *,
                    grid_weights: Sequence[str] = ("0", "1", "3"), per_class: int = 8,
                    acc_weights: Sequence[str] = ("-1", "0", "0.5", "1", "2", "3", "5"),
                    acc_samples: int = 200, judge_name: str = "fmnist",
                    mask: str = "right_half"
                    ) -> dict:
  """Writes into `out` (made if missing): `cfg_grid.png` (one panel per weight of
  `grid_weights`, `per_class` samples per class, one row per class, the same noise for every
  weight), `inpaint.png` (16 test images, `mask` as `guided.complete_test_images`,
  guidance off), and with a judge (`class_judge(run, judge_name)`) the accuracy of
  `acc_samples` samples (classes cycled) per weight of `acc_weights` in `accuracy.png`;
  `accuracy.json` holds the result.

  Returns:
    `{"step", "method", "judge", "grid", "inpaint": {"png", "nfe", "known_error"},
    "accuracy": {weight: fraction}}` (accuracy only with a judge).

  Raises:
    ValueError / FileNotFoundError: an unconditional run, an unknown judge or mask, a
      missing classifier checkpoint (before sampling).
  """
  os.makedirs(out, exist_ok=True)
  config = run.config
  experiment.check_config(config)
  sample = cfg_sampler(run)  # fails early when the run is unconditional
  judge = class_judge(run, judge_name)  # ... or the judge is missing
  num_classes = run.spec.num_classes
  key = jax.random.key(int(config.seed))
  result = dict(step=run.step, method=config.sampling.method, judge=judge_name)

  # Per-class grids: the same starting noise for every weight (same key).
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  panels = {}
  for w in grid_weights:
    start = time.perf_counter()
    panels[f"w = {w}"] = np.asarray(sample(key, labels, float(w)))
    print(f"grid w={w}: {len(labels)} samples in {time.perf_counter() - start:.1f} s",
          flush=True)
  result["grid"] = images.save_side_by_side(panels, os.path.join(out, "cfg_grid.png"),
                                            overwrite=True,
                                            nrow=per_class)

  # Inpainting of test images (guidance off: the unconditional score, i.e. the null label).
  plain = config.copy_and_resolve_references()
  with plain.unlocked():
    plain.sampling.guidance = "none"
  inpainted = guided.complete_test_images(plain, run.workdir, "inpaint", mask=mask,
                                          num_images=16, step=run.step)
  shutil.copy(inpainted["png"], os.path.join(out, "inpaint.png"))
  result["inpaint"] = dict(png=os.path.join(out, "inpaint.png"), nfe=inpainted["nfe"],
                           known_error=inpainted["known_error"])

  # Accuracy against the guidance weight.
  if judge is not None:
    labels = (np.arange(acc_samples) % num_classes).astype(np.int32)
    accuracy = {}
    for i, w in enumerate(acc_weights):
      x = np.asarray(sample(jax.random.fold_in(key, 1 + i), labels, float(w)))
      accuracy[w] = float(np.mean(judge(x) == labels))
      print(f"accuracy at w={w}: {accuracy[w]:.3f}", flush=True)
    result["accuracy"] = accuracy
    plot_accuracy(accuracy, judge_name, os.path.join(out, "accuracy.png"))
  with open(os.path.join(out, "accuracy.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result
