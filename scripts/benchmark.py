"""Throughput and memory of a config's score network: forward pass and train step.

    python scripts/benchmark.py --config=configs/cifar10_vp.py --batch_size=8
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python scripts/benchmark.py --config=configs/fashion_mnist_vp.py --devices=2
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python scripts/benchmark.py --config=configs/fashion_mnist_dit.py --devices=2

Prints one JSON line per measurement: images/s from the median of `--runs` timed calls after
compilation, the compile time separately, the FLOPs of one call (and per image) from XLA's cost analysis
with the achieved TFLOP/s and GFLOP/s (and the fraction of the device's peak on known GPUs / TPUs), and the
peak memory (device `memory_stats()` where the backend has them, else the process's max RSS;
`score_sde.run.timing`). The forward pass is the network in eval mode; the train step is the
one training runs (`programs.make_train_step`): the config's loss, forward + backward,
gradient clipping, the Adam update and the EMA, one optimizer step per call. Both shard the
batch over a `"batch"` mesh of `--devices` devices (on a CPU, simulated ones: each runs its
share on one core, see docs/benchmarks.md). `--precision=bfloat16` runs both in mixed
precision (bfloat16 convolutions and matmuls, float32 parameters; docs/precision.md) and
takes the peak fraction against the device's bfloat16 peak. `--config=path:tiny` picks the
file's tiny variant; `--config.<section>.<field>=value` overrides a field. `--dit_size=S/2`
measures a DiT of that published size (`models.DIT_SIZES`-style name) on the config's data
instead of its network.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from score_sde import models
from score_sde.io import parallel
from score_sde.run import cli, experiment, networks, programs, timing

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:tiny]).",
                                lock_config=False)
flags.DEFINE_integer("batch_size", 8, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("devices", 1, "Data-parallel devices (the batch is sharded over them).",
                     lower_bound=1)
flags.DEFINE_integer("runs", 5, "Timed calls (median).", lower_bound=1)
flags.DEFINE_enum("mode", "both", ["forward", "train", "both"], "What to measure.")
flags.DEFINE_enum("precision", "float32", list(models.PRECISIONS),
                  "Compute precision of the network (forward and train step).")
flags.DEFINE_string("dit_size", None, "Measure a DiT of this size (e.g. 'S/2', 'B/2') on the "
                    "config's data instead of the config's network.")
flags.mark_flags_as_required(["config"])


def benchmark(config, config_name: str, batch_size: int, devices: int, runs: int, mode: str,
              precision: str) -> list[dict]:
  """The measurements (one dict per program, printed as they come).

  Raises:
    ValueError: more devices than visible, or a batch they do not divide.
  """
  config.training.precision = precision  # the train step's (run_spec reads it)
  available = jax.devices()
  if devices > len(available):
    raise ValueError(f"--devices={devices}, but {len(available)} devices are visible "
                     "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  if batch_size % devices:
    raise ValueError(f"--batch_size={batch_size} is not divisible by --devices={devices}")
  spec = experiment.run_spec(config)
  model = models.with_precision(spec.model, precision)
  key = jax.random.key(config.seed)
  variables = jax.jit(lambda k: networks.init_model(k, config, model))(key)
  shape = (batch_size, *spec.image_shape)
  x = jax.random.normal(jax.random.key(1), shape)
  t = jnp.linspace(0.1, 0.9, batch_size)
  base = {"config": config_name, "model": config.model.name,
          "n_params": models.count_params(variables), "batch_size": batch_size,
          "platform": available[0].platform, "device_kind": available[0].device_kind,
          "precision": precision, "devices": devices}
  mesh = parallel.make_mesh(available[:devices])
  replicated = NamedSharding(mesh, P())
  results = []

  def report(name: str, compiled, compile_s: float, run_s: float) -> None:
    use = timing.utilization(compiled, run_s, base["device_kind"], devices, dtype=precision)
    if "gflops_per_call" in use:  # per image, and the achieved rate in GFLOP/s
      use.update(flops_per_image=round(use["gflops_per_call"] * 1e9 / batch_size),
                 achieved_gflop_per_s=round(use["gflops_per_call"] / run_s, 2))
    line = {**base, "mode": name, "compile_s": round(compile_s, 3),
            "median_s": round(run_s, 5), "images_per_s": round(batch_size / run_s, 2),
            **use, **timing.peak_memory()}
    print(json.dumps(line), flush=True)
    results.append(line)

  if mode in ("forward", "both"):
    # The batch sharded over the devices, as the samplers do (`programs.make_sample_fn`).
    batch_sharding = NamedSharding(mesh, P("batch"))
    labels = jax.device_put(spec.score_model.noise_labels(t), batch_sharding)
    args = (jax.device_put(variables, replicated), jax.device_put(x, batch_sharding), labels)
    forward = jax.jit(lambda v, x, labels: model.apply(v, x, labels, train=False))
    compiled, compile_s = timing.compile_timed(forward, *args)
    report("forward", compiled, compile_s, timing.median_seconds(lambda: compiled(*args), runs))

  if mode in ("train", "both"):
    step_fn = programs.make_train_step(spec, mesh=mesh)
    state = jax.jit(lambda k: programs.init_state(k, spec), out_shardings=replicated)(key)
    step_key = jax.device_put(jax.random.PRNGKey(2), replicated)
    x01 = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    batch = parallel.shard_batch({"image": x01, "label": np.zeros((1, batch_size), np.int32)},
                                 mesh, axis=1)
    compiled, compile_s = timing.compile_timed(step_fn, state, step_key, batch)

    def train_step():  # the state is donated: each call takes the previous call's
      nonlocal state
      state, metrics = compiled(state, step_key, batch)
      return metrics

    report("train_step", compiled, compile_s, timing.median_seconds(train_step, runs))
  return results


def main(argv) -> None:
  del argv
  cli.setup()
  name = config_flags.get_config_filename(FLAGS["config"])
  config = FLAGS.config
  if FLAGS.dit_size:
    config = networks.as_dit(config, FLAGS.dit_size)
    name = f"{name} (DiT-{FLAGS.dit_size})"
  sys.exit(cli.execute(lambda: benchmark(config, name, FLAGS.batch_size, FLAGS.devices,
                                         FLAGS.runs, FLAGS.mode, FLAGS.precision)))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
