"""Trains the Fashion-MNIST feature network (`score_sde.models.fmnist_classifier`) and writes
its weights, the test accuracy and the SHA-256 to put into `WEIGHTS_SHA256`.

    python scripts/train_fmnist_classifier.py                       # -> score_sde/assets/fmnist_classifier.npz
    python scripts/train_fmnist_classifier.py --epochs=1 --out=/tmp/c.npz   # a quick try

Reads the idx files with `score_sde.io.datasets.load_idx` (default folder: the Debian package
`dataset-fashion-mnist`). Adam with a cosine learning-rate decay, cross-entropy, random
horizontal flips (optionally shifts); the test split is only evaluated, never trained on.
Deterministic for a given `--seed` on one machine (XLA's CPU reductions may differ across
machines, so the shipped file, not a retraining, is what makes numbers comparable).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from score_sde.io import datasets
from score_sde.models import fmnist_classifier as fc
from score_sde.run import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", datasets.FASHION_MNIST_DIR, "Folder of the four idx files.")
flags.DEFINE_string("out", fc.WEIGHTS_PATH, "The .npz of the weights to write.")
flags.DEFINE_integer("epochs", 8, "Epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
flags.DEFINE_float("lr", 2e-3, "Peak learning rate.", lower_bound=0)
flags.DEFINE_integer("shift", 0, "Random shifts of up to SHIFT pixels.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed.")


def augment(rng: np.random.Generator, x: np.ndarray, shift: int = 0) -> np.ndarray:
  """Random horizontal flips, and shifts of up to `shift` pixels (zero fill), of x [B, 28, 28,
  1]."""
  flip = rng.random(len(x)) < 0.5
  x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
  if shift == 0:
    return x
  padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
  dy, dx = rng.integers(0, 2 * shift + 1, len(x)), rng.integers(0, 2 * shift + 1, len(x))
  rows = dy[:, None] + np.arange(28)[None]
  cols = dx[:, None] + np.arange(28)[None]
  return padded[np.arange(len(x))[:, None, None], rows[:, :, None], cols[:, None, :]]


def accuracy(net, variables, images: np.ndarray, labels: np.ndarray, batch: int = 1000
             ) -> float:
  apply = jax.jit(lambda v, x: net.apply(v, x)[0].argmax(-1))
  correct = 0
  for i in range(0, len(images), batch):
    x = images[i:i + batch].astype(np.float32) / 255.0
    correct += int((np.asarray(apply(variables, x)) == labels[i:i + batch]).sum())
  return correct / len(images)


def main(argv) -> None:
  del argv
  sys.exit(cli.execute(lambda: train(FLAGS)))


def train(args) -> None:
  """Trains, evaluates and writes the classifier (`args`: the flags)."""
  train_x, train_y = datasets.load_idx(args.data_dir, "train")
  test_x, test_y = datasets.load_idx(args.data_dir, "test")
  net = fc.FashionMNISTClassifier()
  key = jax.random.PRNGKey(args.seed)
  init_key, dropout_key = jax.random.split(key)
  variables = net.init(init_key, jnp.zeros((1, *fc.IMAGE_SHAPE)))
  steps_per_epoch = len(train_x) // args.batch_size
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 200, args.epochs * steps_per_epoch)
  optimizer = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = optimizer.init(variables)

  @jax.jit
  def train_step(variables, opt_state, x, y, step):
    def loss_fn(v):
      logits, _ = net.apply(v, x, train=True,
                            rngs={"dropout": jax.random.fold_in(dropout_key, step)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  rng = np.random.default_rng(args.seed)
  step, start = 0, time.perf_counter()
  for epoch in range(args.epochs):
    order = rng.permutation(len(train_x))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * args.batch_size:(i + 1) * args.batch_size]
      x = augment(rng, train_x[idx], args.shift).astype(np.float32) / 255.0
      variables, opt_state, loss = train_step(variables, opt_state, x, train_y[idx], step)
      losses.append(loss)
      step += 1
    print(f"epoch {epoch + 1}/{args.epochs}: train loss {float(np.mean(losses)):.4f}, test "
          f"accuracy {accuracy(net, variables, test_x, test_y):.4f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

  test_accuracy = accuracy(net, variables, test_x, test_y)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  digest = fc.save_variables(args.out, variables)
  print(f"test accuracy {test_accuracy:.4f} ({len(test_x)} images); wrote {args.out}\n"
        f"SHA-256 {digest}  (set fmnist_classifier.WEIGHTS_SHA256 to it when shipping)")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
