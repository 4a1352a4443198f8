"""Evaluation of a checkpoint: test loss, bits/dim, and samples.

`evaluate` writes `workdir/eval/step_<k>/metrics.json` (and samples when enabled); `sample`
writes `workdir/samples/<method>_step_<k>.{npz,png}`. Both use the EMA weights of checkpoint
k (the latest by default) and run on all devices, the batch sharded over `"batch"`.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from score_sde import checkpoints, datasets, images, likelihood, models, quality
from score_sde import train as train_lib


def load_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                    mesh: Mesh | None = None):
  """`(state, step, model, sde)` of checkpoint `step` (None: latest) of `workdir`.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in `workdir/checkpoints`.
  """
  mesh = train_lib.make_mesh() if mesh is None else mesh
  model = models.get_model(config)
  optimizer = train_lib.get_optimizer(config)
  with checkpoints.get_manager(workdir, read_only=True) as manager:
    restored = train_lib.restore_state(manager, config, model, optimizer, mesh, step)
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {checkpoints.checkpoint_dir(workdir)}; train "
                            f"first (--mode=train with the same --workdir)")
  state, step = restored
  return state, step, model, train_lib.get_sde(config)


def _sample_batches(config, state, model, sde, num_samples: int, mesh: Mesh,
                    progress: bool) -> tuple[np.ndarray, int, float]:
  """`num_samples` images in [0, 1] drawn in batches of `sampling.batch_size` with the
  configured sampler; returns (images, NFE per sample, seconds)."""
  from tqdm import tqdm

  method, options = train_lib.sampler_settings(config)
  batch = int(config.sampling.batch_size)
  shape = (batch, *models.image_shape(config))
  sample_fn = train_lib.make_sample_fn(
      sde, model, shape, method, options, continuous=bool(config.training.continuous),
      inverse_scaler=datasets.get_data_inverse_scaler(config.data.centered), mesh=mesh)
  _, _, sample_key, _ = train_lib.run_keys(config)
  variables = state.variables(ema=True)
  out, nfe, start = [], 0, time.perf_counter()
  for i in tqdm(range(-(-num_samples // batch)), desc=f"sample ({method})", unit="batch",
                disable=not progress, dynamic_ncols=True):
    # The same key for batch i of every method: samplers start from the same noise.
    x, nfe = train_lib.to_host(
        sample_fn(variables, jax.random.fold_in(jax.random.fold_in(sample_key, 1 << 30), i)))
    out.append(np.asarray(x))
  return np.concatenate(out)[:num_samples], int(nfe), time.perf_counter() - start


def sample(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
           num_samples: int | None = None, mesh: Mesh | None = None, progress: bool = True
           ) -> dict:
  """Draws samples from checkpoint `step` with `config.sampling` (method and options).

  Writes `workdir/samples/<method>_step_<k>.npz` (`samples`: float32 [N, H, W, C] in [0, 1])
  and a PNG grid of the first 64. Sample batch i starts from the same noise for every method
  (the key depends only on the seed and i), so runs with different `sampling.method` are
  comparable draw by draw.

  Returns:
    dict(npz=path, png=path, nfe=NFE per sample, seconds=wall time, step=k).
  """
  mesh = train_lib.make_mesh() if mesh is None else mesh
  train_lib.check_config(config, mesh)
  state, step, model, sde = load_checkpoint(config, workdir, step, mesh)
  n = int(num_samples or config.eval.num_samples)
  x, nfe, seconds = _sample_batches(config, state, model, sde, n, mesh, progress)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"{config.sampling.method}_step_{step}")
  result = dict(step=step, method=config.sampling.method, nfe=nfe, seconds=seconds,
                npz=stem + ".npz", png=stem + ".png")
  if jax.process_index() == 0:
    np.savez_compressed(result["npz"], samples=x)
    images.save_grid(x[:64], result["png"], scale=2)
  logging.info("%d samples (%s, NFE %d, %.1f s) -> %s", n, config.sampling.method, nfe,
               seconds, result["npz"])
  return result


def _test_loss(config, state, model, sde, mesh: Mesh, progress: bool) -> float:
  """Mean DSM loss (EMA weights, no dropout) over the whole test split."""
  from tqdm import tqdm

  data = datasets.get_dataset(config, "test", process_index=jax.process_index(),
                              process_count=jax.process_count())
  eval_fn = train_lib.make_eval_loss_fn(
      sde, model, train_lib.get_loss_fn(config, sde),
      continuous=bool(config.training.continuous),
      scaler=datasets.get_data_scaler(config.data.centered),
      conditional_labels=int(config.model.get("num_classes", 0)) > 0, mesh=mesh)
  _, _, _, eval_key = train_lib.run_keys(config)
  variables = state.variables(ema=True)
  total, count = 0.0, 0.0
  for i, batch in enumerate(tqdm(data.iterate_once(), total=data.num_batches_once,
                                 desc="test loss", unit="batch", disable=not progress,
                                 dynamic_ncols=True)):
    s, c = train_lib.to_host(eval_fn(variables, jax.random.fold_in(eval_key, i),
                                     train_lib.shard_batch(batch, mesh)))
    total, count = total + float(s), count + float(c)
  return total / count


def _test_bpd(config, state, model, sde, mesh: Mesh, progress: bool) -> dict:
  """Bits/dim (probability-flow ODE, uniform dequantization) of the first
  `eval.bpd_num_examples` test images (None: all)."""
  from tqdm import tqdm

  e = config.eval
  data = datasets.get_dataset(config, "test", process_index=jax.process_index(),
                              process_count=jax.process_count())
  limit = e.get("bpd_num_examples", None) or data.num_examples
  score_variables = state.variables(ema=True)
  continuous = bool(config.training.continuous)
  replicated = NamedSharding(mesh, P())

  @jax.jit
  def bpd_fn(variables, key, x01):
    score_fn = models.get_score_fn(sde, model, variables, train=False, continuous=continuous)
    return likelihood.bits_per_dim_of_batch(
        key, score_fn, sde, x01, centered=bool(config.data.centered),
        uniform_dequantization=True, rtol=float(e.get("bpd_rtol", 1e-5)),
        atol=float(e.get("bpd_atol", 1e-5)), eps=1e-5)

  _, _, _, eval_key = train_lib.run_keys(config)
  values, nfes, seen, start = [], [], 0, time.perf_counter()
  batches = -(-limit // data.batch_size)
  for i, batch in enumerate(tqdm(data.iterate_once(), total=batches, desc="bits/dim",
                                 unit="batch", disable=not progress, dynamic_ncols=True)):
    if seen >= limit:
      break
    x01, mask = train_lib.shard_batch((batch["image"], batch["mask"]), mesh)
    bpd, nfe = bpd_fn(score_variables, jax.device_put(jax.random.fold_in(eval_key, 1 << 20 | i),
                                                      replicated), x01)
    bpd, mask = train_lib.to_host((bpd, mask))  # the global batch, on every host
    keep = mask & (np.arange(len(mask)) + seen < limit)
    values.append(np.asarray(bpd)[keep])
    nfes.append(int(train_lib.to_host(nfe)))
    seen += int(keep.sum())
  bpd = np.concatenate(values)
  return dict(bpd=float(bpd.mean()), bpd_stderr=float(bpd.std(ddof=1) / np.sqrt(len(bpd)))
              if len(bpd) > 1 else float("nan"), bpd_num_examples=int(len(bpd)),
              bpd_mean_nfe=float(np.mean(nfes)), bpd_seconds=time.perf_counter() - start)


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
             mesh: Mesh | None = None, progress: bool = True) -> dict:
  """Evaluates checkpoint `step` (None: latest) as `config.eval` asks.

  `eval.enable_loss`: the DSM loss over the test split; `eval.enable_bpd`: bits/dim on the
  test split (first `eval.bpd_num_examples`; offset 7 for centered data, 8 otherwise, after
  uniform dequantization, so comparable with published numbers); `eval.enable_sampling`:
  `eval.num_samples` samples as in `sample`; `eval.enable_fid`: FID / KID / IS / precision /
  recall of those samples (`quality.sample_quality`), also written to TensorBoard.

  Returns:
    The metrics dict, also written to `workdir/eval/step_<k>/metrics.json`.
  """
  mesh = train_lib.make_mesh() if mesh is None else mesh
  train_lib.check_config(config, mesh)
  state, step, model, sde = load_checkpoint(config, workdir, step, mesh)
  e = config.eval
  metrics: dict = dict(step=step)
  if e.enable_loss:
    metrics["test_loss"] = _test_loss(config, state, model, sde, mesh, progress)
    logging.info("step %d: test loss %.5f", step, metrics["test_loss"])
  if e.enable_bpd:
    metrics.update(_test_bpd(config, state, model, sde, mesh, progress))
    logging.info("step %d: %.4f +- %.4f bits/dim on %d test images (mean NFE %.0f)", step,
                 metrics["bpd"], metrics["bpd_stderr"], metrics["bpd_num_examples"],
                 metrics["bpd_mean_nfe"])
  out_dir = os.path.join(workdir, "eval", f"step_{step}")
  if e.enable_sampling or e.get("enable_fid", False):
    x, nfe, seconds = _sample_batches(config, state, model, sde, int(e.num_samples), mesh,
                                      progress)
    metrics.update(samples_nfe=nfe, samples_seconds=seconds)
    if jax.process_index() == 0:
      os.makedirs(out_dir, exist_ok=True)
      np.savez_compressed(os.path.join(out_dir, "samples.npz"), samples=x)
      images.save_grid(x[:64], os.path.join(out_dir, "samples.png"), scale=2)
    if e.get("enable_fid", False):  # FID / KID / IS / precision / recall (score_sde.quality)
      metrics.update(quality.sample_quality(config, x))
      quality.log_metrics(metrics, step, workdir)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
