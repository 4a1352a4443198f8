"""Evaluation of a checkpoint: test loss, bits/dim, and samples.

`evaluate` writes `workdir/eval/step_<k>/metrics.json` (and samples when enabled); `sample`
writes `workdir/samples/<method>_step_<k>.{npz,png}`. Both use the EMA weights of checkpoint
k (the latest by default) and run on all devices, the batch sharded over `"batch"`.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from score_sde import likelihood, solvers
from score_sde.io import files, images, parallel
from score_sde.io import workdir as workdir_lib
from score_sde.run import experiment, guided, keys, programs, quality


def _sample_batches(config, state, spec: experiment.RunSpec, num_samples: int, mesh: Mesh,
                    progress: bool, sample_fn=None, latents: list | None = None
                    ) -> tuple[np.ndarray, int, float]:
  """`num_samples` images in [0, 1] drawn in batches of `sampling.batch_size` with the
  configured sampler; returns (images, NFE per sample, seconds). With `latents` (a list, for
  a latent run, and `sample_fn` made with `decode=False`), the sampled latents are appended
  to it and decoded here."""
  from tqdm import tqdm

  method, options = experiment.sampler_settings(config)
  batch = int(config.sampling.batch_size)
  shape = (batch, *spec.image_shape)
  if sample_fn is None:  # else a guided one (score_sde.run.guided)
    sample_fn = programs.make_sample_fn(spec, shape, method, options, mesh=mesh,
                                        decode=latents is None,
                                        stored_as=experiment.program_description(config, spec))
  decode = None if latents is None else spec.latent.make_decode_fn(mesh)
  _, _, sample_key, _ = experiment.run_keys(config)
  variables = state.variables(ema=True)
  out, nfe, start = [], 0, time.perf_counter()
  for i in tqdm(range(-(-num_samples // batch)), desc=f"sample ({method})", unit="batch",
                disable=not progress, dynamic_ncols=True):
    # The same key for batch i of every method: samplers start from the same noise.
    x, nfe = sample_fn(variables, jax.random.fold_in(jax.random.fold_in(
        sample_key, keys.SAMPLE_BATCHES), i))
    if decode is not None:
      latents.append(np.asarray(parallel.to_host(x)))
      x = decode(x)
    x, nfe = parallel.to_host((x, nfe))
    out.append(np.asarray(x))
  return np.concatenate(out)[:num_samples], int(nfe), time.perf_counter() - start


def sampler_tag(config: ml_collections.ConfigDict) -> str:
  """What makes a set of samples, for file names: e.g. 'euler_maruyama-langevin-steps100'
  (pc), 'tsit5-rtol1e-05-atol1e-05' (ode), 'order2-steps25' (dpm_solver)."""
  method, options = experiment.sampler_settings(config)
  steps = options.get("steps")
  parts = {"pc": [options.get("predictor"), options.get("corrector")],
           "ode": [options.get("solver")] + ([] if steps else [
               f"rtol{options.get('rtol'):g}", f"atol{options.get('atol'):g}"]),
           "ddim": [f"eta{options.get('eta', 0.0):g}"],
           "dpm_solver": [f"order{options.get('order')}"]}.get(method, [])
  if steps or method != "ode":
    parts.append(f"steps{steps or experiment.make_sde(config).N}")
  return "-".join(str(p) for p in parts if p is not None)


def _capped_batch(config: ml_collections.ConfigDict, num_samples: int, mesh: Mesh
                  ) -> ml_collections.ConfigDict:
  """`config` with `sampling.batch_size` at most `num_samples` (rounded up to a multiple of
  the devices): a batch larger than the samples asked for only costs memory."""
  devices = int(np.prod(list(mesh.shape.values())))
  needed = -(-num_samples // devices) * devices
  if int(config.sampling.batch_size) <= needed:
    return config
  logging.info("config.sampling.batch_size=%d capped to %d (the %d samples asked for)",
               int(config.sampling.batch_size), needed, num_samples)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.sampling.batch_size = needed
  return config


def _check_num_samples(num_samples) -> int:
  if (isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer))
      or num_samples < 1):
    raise ValueError(f"--num_samples must be an integer >= 1, got {num_samples!r}")
  return int(num_samples)


def sample(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
           num_samples: int | None = None, mesh: Mesh | None = None, progress: bool = True
           ) -> dict:
  """Draws samples from checkpoint `step` with `config.sampling` (method and options).

  Writes `workdir/samples/<method>_step_<k>_<tag>_n<N>.npz` (`samples`: float32
  [N, H, W, C] in [0, 1], decoded to pixels for a latent run, which also saves `latents`
  [N, h, w, L], the scaled latents the sampler drew; `tag` from `sampler_tag`, e.g. the steps) and a PNG grid of the
  first 64; if those names exist, `....<i>.npz` with a fresh index i: nothing is
  overwritten. Sample batch i starts from the same noise for every method (the key depends
  only on the seed and i), so runs with different `sampling.method` are comparable draw by
  draw.

  Args:
    num_samples: how many (>= 1; None: `config.eval.num_samples`).

  Returns:
    dict(npz=path, png=path, nfe=NFE per sample, seconds=wall time, step=k).
  """
  n = _check_num_samples(config.eval.num_samples if num_samples is None else num_samples)
  workdir_lib.check_workdir(workdir, must_exist=True)
  mesh = parallel.make_mesh() if mesh is None else mesh
  experiment.check_config(config, mesh, "sample")
  config = _capped_batch(config, n, mesh)
  guided.check_guidance(config, workdir)
  run = programs.restore_run(config, workdir, step, mesh, ema_only=True)
  state, step, spec = run.state, run.step, run.spec
  latents = None if spec.latent is None else []  # a latent run also saves its latents
  guided_fn = guided.make_guided_sample_fn(
      config, workdir, spec, (int(config.sampling.batch_size), *spec.image_shape),
      mesh, decode=latents is None)
  x, nfe, seconds = _sample_batches(config, state, spec, n, mesh, progress, guided_fn, latents)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  stem = workdir_lib.fresh_stem(
      out_dir, f"{config.sampling.method}{guided.sample_tag(config)}_step_{step}_"
      f"{sampler_tag(config)}_n{n}",
      (".npz", ".png"))
  result = dict(step=step, method=config.sampling.method, nfe=nfe, seconds=seconds,
                npz=stem + ".npz", png=stem + ".png")
  if jax.process_index() == 0:
    extra = {} if latents is None else {"latents": np.concatenate(latents)[:n]}
    files.save_npz(result["npz"], samples=x, **extra)
    images.save_grid(x[:64], result["png"], scale=2)
  logging.info("%d samples (%s, NFE %d, %.1f s) -> %s", n, config.sampling.method, nfe,
               seconds, result["npz"])
  return result


def _test_loss(config, state, spec: experiment.RunSpec, mesh: Mesh, progress: bool
               ) -> float:
  """Mean DSM loss (EMA weights, no dropout) over the whole test split."""
  from tqdm import tqdm

  data = experiment.make_dataset(config, "test", process_index=jax.process_index(),
                              process_count=jax.process_count())
  eval_fn = programs.make_eval_loss_fn(spec, mesh=mesh)
  _, _, _, eval_key = experiment.run_keys(config)
  variables = state.variables(ema=True)
  total, count = 0.0, 0.0
  for i, batch in enumerate(tqdm(data.iterate_once(), total=data.num_batches_once,
                                 desc="test loss", unit="batch", disable=not progress,
                                 dynamic_ncols=True)):
    s, c = parallel.to_host(eval_fn(variables, jax.random.fold_in(eval_key, i),
                                    parallel.shard_batch(batch, mesh)))
    total, count = total + float(s), count + float(c)
  return total / count


def _with_code(outputs: tuple) -> tuple:
  """`(..., diffrax result)` with the result as its code (`solvers.result_code`): a stored
  program's outputs must be plain arrays."""
  return (*outputs[:-1], solvers.result_code(outputs[-1]))


def _test_bpd(config, state, spec: experiment.RunSpec, mesh: Mesh, progress: bool) -> dict:
  """Bits/dim (probability-flow ODE, uniform dequantization) of the first
  `eval.bpd_num_examples` test images (None: all)."""
  from tqdm import tqdm

  e = config.eval
  data = experiment.make_dataset(config, "test", process_index=jax.process_index(),
                              process_count=jax.process_count())
  limit = e.get("bpd_num_examples", None) or data.num_examples
  score_variables = state.variables(ema=True)
  sde, score_model = spec.sde, spec.score_model_for("eval")
  replicated = NamedSharding(mesh, P())

  def pixel_bpd_fn(variables, key, x01):
    score_fn = score_model.score_fn(variables)
    return _with_code(likelihood.bits_per_dim_of_batch(
        key, score_fn, sde, x01, centered=bool(config.data.centered),
        uniform_dequantization=True, rtol=float(e.get("bpd_rtol", 1e-5)),
        atol=float(e.get("bpd_atol", 1e-5)), eps=1e-5, return_result=True))

  # Stored: a warm start does not trace it.
  description = experiment.program_description(config, spec)
  stored_pixel_bpd_fn = programs.stored_program(
      jax.jit(pixel_bpd_fn), None if description is None else f"pixel_bpd_fn {description}")

  if spec.latent is not None:
    # A latent run: -log p(z) / dim of the scaled latents of the test images, in nats; not
    # comparable with pixel bits/dim (no decoder likelihood, no dequantization).
    encode = spec.latent.make_encode_fn(mesh, steps_axis=False)
    dims = float(np.prod(spec.image_shape))

    @jax.jit
    def latent_nats_fn(variables, key, z):
      logp, _, nfe, result = likelihood.log_likelihood(
          key, score_model.score_fn(variables), sde, z, rtol=float(e.get("bpd_rtol", 1e-5)),
          atol=float(e.get("bpd_atol", 1e-5)), eps=1e-5, return_result=True)
      return -logp / dims, nfe, solvers.result_code(result)

    def latent_bpd_fn(variables, key, x01):
      return latent_nats_fn(variables, key, encode(key, 0, x01))

  bpd_fn = stored_pixel_bpd_fn if spec.latent is None else latent_bpd_fn

  _, _, _, eval_key = experiment.run_keys(config)
  values, nfes, seen, start = [], [], 0, time.perf_counter()
  batches = -(-limit // data.batch_size)
  for i, batch in enumerate(tqdm(data.iterate_once(), total=batches, desc="bits/dim",
                                 unit="batch", disable=not progress, dynamic_ncols=True)):
    if seen >= limit:
      break
    x01, mask = parallel.shard_batch((batch["image"], batch["mask"]), mesh)
    bpd, nfe, result = bpd_fn(score_variables, jax.device_put(
        jax.random.fold_in(eval_key, keys.BPD_BATCHES | i), replicated), x01)
    # No run-time check is compiled in (so the program is cached): a failed solve is an
    # error here, e.g. eval.bpd_rtol / bpd_atol too tight for the solver's step budget.
    solvers.check_result(parallel.to_host(result),
                         "the bits/dim probability-flow ODE solve")
    bpd, mask = parallel.to_host((bpd, mask))  # the global batch, on every host
    keep = mask & (np.arange(len(mask)) + seen < limit)
    values.append(np.asarray(bpd)[keep])
    nfes.append(int(parallel.to_host(nfe)))
    seen += int(keep.sum())
  bpd = np.concatenate(values)
  if spec.latent is not None:
    return dict(latent_nats_per_dim=float(bpd.mean()),
                latent_nats_per_dim_stderr=float(bpd.std(ddof=1) / np.sqrt(len(bpd)))
                if len(bpd) > 1 else float("nan"), bpd_num_examples=int(len(bpd)),
                bpd_mean_nfe=float(np.mean(nfes)), bpd_seconds=time.perf_counter() - start)
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
    The metrics dict, also written to `workdir/eval/step_<k>/metrics.json` (or
    `metrics.<i>.json` with a fresh index i if that exists; samples likewise): its path is
    returned as `metrics_json`.
  """
  workdir_lib.check_workdir(workdir, must_exist=True)
  mesh = parallel.make_mesh() if mesh is None else mesh
  experiment.check_config(config, mesh, "eval")
  e = config.eval
  # Every FID setting before any work (not after hours of test loss and samples).
  net = quality.check_settings(config) if e.get("enable_fid", False) else None
  if e.enable_sampling or e.get("enable_fid", False):
    config = _capped_batch(config, int(e.num_samples), mesh)
  run = programs.restore_run(config, workdir, step, mesh, ema_only=True)
  state, step, spec = run.state, run.step, run.spec
  metrics: dict = dict(step=step)
  if e.enable_loss:
    metrics["test_loss"] = _test_loss(config, state, spec, mesh, progress)
    logging.info("step %d: test loss %.5f", step, metrics["test_loss"])
  if e.enable_bpd:
    metrics.update(_test_bpd(config, state, spec, mesh, progress))
    if spec.latent is not None:
      logging.info("step %d: %.4f +- %.4f latent nats/dim (not pixel bits/dim) on %d test "
                   "images (mean NFE %.0f)", step, metrics["latent_nats_per_dim"],
                   metrics["latent_nats_per_dim_stderr"], metrics["bpd_num_examples"],
                   metrics["bpd_mean_nfe"])
    else:
      logging.info("step %d: %.4f +- %.4f bits/dim on %d test images (mean NFE %.0f)", step,
                   metrics["bpd"], metrics["bpd_stderr"], metrics["bpd_num_examples"],
                   metrics["bpd_mean_nfe"])
  out_dir = os.path.join(workdir, "eval", f"step_{step}")
  if e.enable_sampling or e.get("enable_fid", False):
    x, nfe, seconds = _sample_batches(config, state, spec, int(e.num_samples), mesh,
                                      progress)
    metrics.update(samples_nfe=nfe, samples_seconds=seconds)
    if jax.process_index() == 0:
      os.makedirs(out_dir, exist_ok=True)
      stem = workdir_lib.fresh_stem(
          out_dir, f"samples_{sampler_tag(config)}_n{int(e.num_samples)}", (".npz", ".png"))
      files.save_npz(stem + ".npz", samples=x)
      images.save_grid(x[:64], stem + ".png", scale=2)
    if e.get("enable_fid", False):  # FID / KID / IS / precision / recall (score_sde.run.quality)
      metrics.update(quality.sample_quality(config, x, net))
      quality.log_metrics(metrics, step, workdir)
  path = workdir_lib.fresh_stem(out_dir, "metrics", (".json",)) + ".json"
  if jax.process_index() == 0:
    files.write_json(path, {k: (v if not isinstance(v, float) or np.isfinite(v) else None)
                            for k, v in metrics.items()})
  return {**metrics, "metrics_json": path}
