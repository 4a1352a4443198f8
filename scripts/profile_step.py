"""Where the time of a compiled forward pass or train step goes: a profile of one config's
network, per kind of work (convolution, normalization, attention, resampling, the optimizer
and EMA, layout copies, ...).

    python scripts/profile_step.py --config=configs/cifar10_vp.py:small --batch_size=32
    python scripts/profile_step.py --config=configs/fashion_mnist_vp.py --mode=train

Runs the program under `jax.profiler` (`--runs` calls after a warm-up), reads the per-thunk
events of the trace (XLA:CPU emits one per fused kernel; on a GPU, per kernel), and maps
each event to the HLO instruction of the compiled program it ran: its `op_name` metadata
names the Flax module path (`NCSNpp/ResnetBlock_3/GroupNorm_1/...`, `transpose(...)` for
the backward pass), the fused computation names the operations. Prints a table of
milliseconds per call by category and by operation, and with `--top` the slowest kernels.
"""

from __future__ import annotations

import collections
import glob
import json
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from score_sde.io import parallel
from score_sde.run import cli, experiment, networks, programs, timing

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None,
                                "Experiment config file (configs/*.py[:variant]).",
                                lock_config=False)
flags.DEFINE_integer("batch_size", 8, "Batch size.", lower_bound=1)
flags.DEFINE_enum("mode", "forward", ["forward", "train"], "What to profile.")
flags.DEFINE_integer("runs", 3, "Timed and traced calls.", lower_bound=1)
flags.DEFINE_integer("top", 0, "Also print the N slowest kernels.", lower_bound=0)
flags.mark_flags_as_required(["config"])

# (category, pattern on the op_name metadata), first match wins. Layer names are the Flax
# module paths of score_sde.models.
CATEGORIES = (
    ("attention (QK^T, softmax, AV)", r"AttnBlock_\d+/(?!Dense|GroupNorm)"),
    ("group norm", r"GroupNorm"),
    ("FIR / resampling", r"FIRConv|upfirdn|Upsample|Downsample|resample"),
    ("3x3 convolution", r"/Conv_\d+/"),
    ("1x1 convolution / dense", r"/Dense_\d+/|/Combine"),
    ("embeddings", r"GaussianFourier|class_embed|timestep|/sin|/cos"),
)


def parse_hlo(text: str) -> dict[str, tuple[str, list[str]]]:
  """`instruction name -> (op_name metadata, operations it runs)` of a compiled HLO module.

  A fusion's operations are those of the computation it calls; where the fusion has no
  `op_name` of its own, that of its convolution / dot, or else of its root (or else the
  first named) instruction.
  """
  computations: dict[str, list[tuple[str, str, bool]]] = {}  # name -> [(op, op_name, root)]
  instructions: dict[str, tuple[str, str, str | None]] = {}
  current = None
  for line in text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      computations[current] = []
      continue
    match = re.match(r"\s*(ROOT )?%?([\w.\-]+) = .*?\s([\w\-]+)\(", line)
    if current is None or not match:
      continue
    root, name, op = match.groups()
    op_name = re.search(r'op_name="([^"]*)"', line)
    op_name = op_name.group(1) if op_name else ""
    computations[current].append((op, op_name, bool(root)))
    callee = re.search(r"calls=%?([\w.\-]+)", line)
    instructions[name] = (op_name, op, callee.group(1) if callee else None)

  def inner_name(callee: str) -> str:
    body = computations.get(callee, [])
    named = ([n for op, n, _ in body if n and op in ("convolution", "dot")]
             + [n for _, n, root in body if n and root] + [n for _, n, _ in body if "/" in n])
    return named[0] if named else ""

  out = {}
  for name, (op_name, op, callee) in instructions.items():
    if callee is None:
      out[name] = (op_name, [op])
    else:
      out[name] = (op_name or inner_name(callee), [o for o, _, _ in computations.get(callee, [])])
  return out


def operation_kind(ops: list[str]) -> str:
  for kind, names in (("convolution", {"convolution"}), ("dot", {"dot"}),
                      ("reduce", {"reduce", "reduce-window"}),
                      ("layout copy", {"transpose", "copy"}),
                      ("concat / pad / slice", {"concatenate", "pad", "slice",
                                                 "dynamic-slice", "dynamic-update-slice"})):
    if names & set(ops):
      return kind
  return "elementwise"


def category(op_name: str, ops: list[str]) -> str:
  """The kind of work of a kernel, from its `op_name` (the module path) and operations."""
  if op_name and "NCSNpp" not in op_name and "DDPM" not in op_name:
    return "outside the network (loss, optimizer, EMA)"
  for name, pattern in CATEGORIES:
    if re.search(pattern, op_name):
      return name
  # Instructions XLA made without a source (e.g. the kernel gradient of a convolution).
  kind = operation_kind(ops)
  return {"convolution": "3x3 convolution", "dot": "1x1 convolution / dense"}.get(
      kind, f"other ({kind})")


def profile(call, runs: int) -> tuple[float, list[tuple[str, float]]]:
  """(median wall ms per call, [(kernel name, ms per call)]): `runs` timed calls of
  `call()`, then `runs` traced ones."""
  wall_ms = timing.median_seconds(call, runs) * 1e3
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory)
    for _ in range(runs):
      jax.block_until_ready(call())
    jax.profiler.stop_trace()
    path = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
  kernels: collections.Counter = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name.startswith("python"):
        continue
      for event in line.events:
        # Executor, thread-pool and end-of-kernel markers are not kernels.
        if not event.name.startswith(("ThunkExecutor", "ThreadpoolListener", "end: ")):
          kernels[event.name] += event.duration_ns
  return wall_ms, [(k, ns / runs / 1e6) for k, ns in kernels.most_common()]


def profile_program(config, config_name: str, batch_size: int, mode: str, runs: int,
                    top: int) -> dict:
  """Profiles the config's forward pass or train step; prints the tables, returns the JSON
  summary."""
  spec = experiment.run_spec(config)
  model = spec.model
  key = jax.random.key(config.seed)
  shape = (batch_size, *spec.image_shape)
  if mode == "forward":
    variables = jax.jit(lambda k: networks.init_model(k, config, model))(key)
    x = jax.random.normal(jax.random.key(1), shape)
    labels = spec.score_model.noise_labels(jnp.linspace(0.1, 0.9, batch_size))
    compiled = jax.jit(lambda v, x, l: model.apply(v, x, l, train=False)).lower(
        variables, x, labels).compile()

    def call():
      return compiled(variables, x, labels)
  else:
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = jax.jit(lambda k: programs.init_state(k, spec),
                    out_shardings=NamedSharding(mesh, P()))(key)
    images = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    batch = parallel.shard_batch({"image": images, "label": np.zeros((1, batch_size),
                                                                     np.int32)}, mesh, axis=1)
    step_key = jax.random.PRNGKey(2)
    compiled = programs.make_train_step(spec, mesh=mesh).lower(state, step_key, batch).compile()

    def call():  # the state is donated: each call takes the previous call's
      nonlocal state
      state, metrics = compiled(state, step_key, batch)
      return metrics

  hlo = parse_hlo(compiled.as_text())
  wall_ms, kernels = profile(call, runs)
  by_category: collections.Counter = collections.Counter()
  by_kind: collections.Counter = collections.Counter()
  for name, ms in kernels:
    op_name, ops = hlo.get(name, ("", ["?"]))
    by_category[category(op_name, ops)] += ms
    by_kind[operation_kind(ops)] += ms
  kernel_ms = sum(ms for _, ms in kernels)
  print(f"{config_name} {mode} batch {batch_size}: {wall_ms:.1f} ms per call "
        f"({kernel_ms:.1f} ms in kernels; {jax.devices()[0].device_kind})")
  for title, table in (("by layer", by_category), ("by operation", by_kind)):
    print(f"  {title}:")
    for name, ms in table.most_common():
      print(f"    {name:32s} {ms:9.1f} ms {100 * ms / kernel_ms:5.1f}%")
  for name, ms in kernels[:top]:
    op_name, ops = hlo.get(name, ("", ["?"]))
    print(f"    {ms:8.2f} ms  {name:28s} {operation_kind(ops):12s} {op_name[:90]}")
  summary = {"config": config_name, "mode": mode, "batch_size": batch_size,
             "wall_ms": round(wall_ms, 2),
             "by_layer_ms": {k: round(v, 2) for k, v in by_category.items()},
             "by_operation_ms": {k: round(v, 2) for k, v in by_kind.items()}}
  print(json.dumps(summary))
  return summary


def main(argv) -> None:
  del argv
  cli.setup()
  name = config_flags.get_config_filename(FLAGS["config"])
  sys.exit(cli.execute(lambda: profile_program(FLAGS.config, name, FLAGS.batch_size,
                                               FLAGS.mode, FLAGS.runs, FLAGS.top)))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
