"""Training of the Fashion-MNIST feature network (`score_sde.models.fmnist_classifier`), the
network whose features the FD / KID / precision-recall of the Fashion-MNIST runs use
(`scripts/train_fmnist_classifier.py` is its command line).

Adam with a cosine learning-rate decay, cross-entropy, random horizontal flips (optionally
shifts); the test split is only evaluated, never trained on. Deterministic for a given seed on
one machine (XLA's CPU reductions may differ across machines, so the shipped file, not a
retraining, is what makes numbers comparable).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_sde.models import fmnist_classifier as fc
from score_sde.io import datasets


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


def train(data_dir: str = datasets.FASHION_MNIST_DIR, out: str = fc.WEIGHTS_PATH, *,
          epochs: int = 8, batch_size: int = 128, lr: float = 2e-3, shift: int = 0,
          seed: int = 0) -> dict:
  """Trains the classifier on the train split of the idx files in `data_dir`, evaluates it
  on the test split after every epoch (printed) and writes its weights to `out`.

  Returns:
    `{"test_accuracy": ..., "sha256": ..., "path": out}`.
  """
  train_x, train_y = datasets.load_idx(data_dir, "train")
  test_x, test_y = datasets.load_idx(data_dir, "test")
  net = fc.FashionMNISTClassifier()
  key = jax.random.PRNGKey(seed)
  init_key, dropout_key = jax.random.split(key)
  variables = net.init(init_key, jnp.zeros((1, *fc.IMAGE_SHAPE)))
  steps_per_epoch = len(train_x) // batch_size
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, 200, epochs * steps_per_epoch)
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

  rng = np.random.default_rng(seed)
  step, start = 0, time.perf_counter()
  for epoch in range(epochs):
    order = rng.permutation(len(train_x))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      x = augment(rng, train_x[idx], shift).astype(np.float32) / 255.0
      variables, opt_state, loss = train_step(variables, opt_state, x, train_y[idx], step)
      losses.append(loss)
      step += 1
    print(f"epoch {epoch + 1}/{epochs}: train loss {float(np.mean(losses)):.4f}, test "
          f"accuracy {accuracy(net, variables, test_x, test_y):.4f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

  test_accuracy = accuracy(net, variables, test_x, test_y)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  digest = fc.save_variables(out, variables)
  print(f"test accuracy {test_accuracy:.4f} ({len(test_x)} images); wrote {out}\n"
        f"SHA-256 {digest}  (set fmnist_classifier.WEIGHTS_SHA256 to it when shipping)")
  return {"test_accuracy": test_accuracy, "sha256": digest, "path": out}
