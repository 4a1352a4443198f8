"""Throughput and memory of a config's score network: forward pass and train step.

    python scripts/benchmark.py --config=configs/cifar10_vp.py --batch_size=8
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python scripts/benchmark.py --config=configs/fashion_mnist_vp.py --devices=2

Prints one JSON line per measurement: images/s from the median of `--runs` timed calls after
compilation, the compile time separately, the FLOPs of one call from XLA's cost analysis with
the achieved TFLOP/s (and the fraction of the device's peak on known GPUs / TPUs), and the
peak memory (device `memory_stats()` where the backend has them, else the process's max RSS).
The forward pass is the network in eval mode; the train step is the one `train.py` runs: the
config's loss, forward + backward, gradient clipping, the Adam update and the EMA, one
optimizer step per call. Both shard the batch over a `"batch"` mesh of `--devices` devices
(on a CPU, simulated ones: each runs its share on one core, see docs/benchmarks.md).
`--precision bfloat16` runs both in mixed precision (bfloat16 convolutions and matmuls,
float32 parameters; docs/precision.md) and takes the peak fraction against the device's
bfloat16 peak. A config path may end in `:tiny` for its tiny variant.
"""

from __future__ import annotations

import argparse
import json
import resource
from typing import Any

import common  # scripts/common.py; puts the repository root on sys.path
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from score_sde.run import experiment, train
from score_sde import models
from score_sde.io import parallel


def peak_memory() -> dict:
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_memory_bytes": int(stats["peak_bytes_in_use"]), "memory_source": "device"}
  # ru_maxrss is in KiB on Linux.
  return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "memory_source": "process_max_rss"}


# Vendor peak dense matrix throughput (FLOP/s) by device kind and compute dtype, for the
# fraction-of-peak column; devices not listed (CPUs among them) get no fraction.
PEAK_FLOPS = {
    "H200": {"float32": 67e12, "bfloat16": 989e12},
    "H100": {"float32": 67e12, "bfloat16": 989e12},
    "A100": {"float32": 19.5e12, "bfloat16": 312e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
}


def utilization(compiled, seconds: float, device_kind: str, devices: int = 1,
                dtype: str = "float32") -> dict:
  """XLA's FLOP count of one call of `compiled` (all `devices` together: XLA counts one
  device's share of a partitioned program), the achieved FLOP/s at `seconds` per call, and
  the fraction of one device's peak where `PEAK_FLOPS` knows it."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  flops = float((analysis or {}).get("flops", 0.0)) * devices
  if flops <= 0:
    return {}
  out = {"gflops_per_call": round(flops / 1e9, 3),
         "achieved_tflops": round(flops / seconds / 1e12, 4)}
  for kind, peaks in PEAK_FLOPS.items():
    if kind.lower() in device_kind.lower() and dtype in peaks:
      out["peak_fraction"] = round(flops / devices / seconds / peaks[dtype], 4)
  return out


def time_compiled(fn, args, runs: int) -> tuple[Any, float, float]:
  """(compiled, compile seconds, median run seconds) of `jax.jit`-ed `fn` on `args`."""
  compiled, compile_s = common.compile_timed(fn, *args)
  return compiled, compile_s, common.median_seconds(lambda: compiled(*args), runs)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="config file, optionally ':tiny'")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--devices", type=int, default=1,
                      help="data-parallel devices (the batch is sharded over them)")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--mode", choices=("forward", "train", "both"), default="both")
  parser.add_argument("--precision", choices=tuple(models.PRECISIONS), default="float32",
                      help="compute precision of the network (forward and train step)")
  args = parser.parse_args(argv)

  config = common.load_config(args.config)
  config.training.precision = args.precision  # the train step's (run_spec reads it)
  available = jax.devices()
  if not 1 <= args.devices <= len(available):
    raise ValueError(f"--devices={args.devices}, but {len(available)} devices are visible "
                     "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  if args.batch_size % args.devices:
    raise ValueError(f"--batch_size={args.batch_size} is not divisible by "
                     f"--devices={args.devices}")

  model = models.with_precision(models.get_model(config), args.precision)
  sde = experiment.make_sde(config)
  continuous = bool(config.training.continuous)
  key = jax.random.key(config.seed)
  variables = jax.jit(lambda k: models.init_model(k, config, model))(key)
  x = jax.random.normal(jax.random.key(1), (args.batch_size, *models.image_shape(config)))
  t = jnp.linspace(0.1, 0.9, args.batch_size)
  base = {"config": args.config, "model": config.model.name,
          "n_params": models.count_params(variables), "batch_size": args.batch_size,
          "platform": available[0].platform, "device_kind": available[0].device_kind,
          "precision": args.precision}

  mesh = parallel.make_mesh(available[:args.devices])
  replicated = NamedSharding(mesh, P())
  if args.mode in ("forward", "both"):
    # The batch sharded over the devices, as the samplers do (`train.make_sample_fn`).
    batch_sharding = NamedSharding(mesh, P("batch"))
    labels = jax.device_put(sde.noise_labels(t, continuous), batch_sharding)
    forward = jax.jit(lambda v, x, labels: model.apply(v, x, labels, train=False))
    compiled, compile_s, run_s = time_compiled(
        forward, (jax.device_put(variables, replicated), jax.device_put(x, batch_sharding),
                  labels), args.runs)
    print(json.dumps({**base, "mode": "forward", "devices": args.devices,
                      "compile_s": round(compile_s, 3),
                      "median_s": round(run_s, 5),
                      "images_per_s": round(args.batch_size / run_s, 2),
                      **utilization(compiled, run_s, base["device_kind"], args.devices,
                                    dtype=args.precision), **peak_memory()}),
          flush=True)

  if args.mode in ("train", "both"):
    spec = experiment.run_spec(config)
    optimizer = spec.optimizer
    step_fn = train.make_train_step(spec, mesh=mesh)
    state = jax.jit(lambda k: train.init_state(k, config, model, optimizer),
                    out_shardings=replicated)(key)
    step_key = jax.device_put(jax.random.PRNGKey(2), replicated)
    x01 = np.random.default_rng(0).random((1, args.batch_size, *models.image_shape(config)),
                                          dtype=np.float32)
    batch = parallel.shard_batch({"image": x01, "label": np.zeros((1, args.batch_size),
                                                              np.int32)}, mesh, axis=1)
    compiled, compile_s = common.compile_timed(step_fn, state, step_key, batch)

    def train_step():  # the state is donated: each call takes the previous call's
      nonlocal state
      state, metrics = compiled(state, step_key, batch)
      return metrics

    run_s = common.median_seconds(train_step, args.runs)
    print(json.dumps({**base, "mode": "train_step", "devices": args.devices,
                      "compile_s": round(compile_s, 3), "median_s": round(run_s, 5),
                      "images_per_s": round(args.batch_size / run_s, 2),
                      **utilization(compiled, run_s, base["device_kind"], args.devices,
                                    dtype=args.precision),
                      **peak_memory()}),
          flush=True)


if __name__ == "__main__":
  main()
