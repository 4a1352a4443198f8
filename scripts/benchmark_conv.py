"""One 3x3 convolution on XLA:CPU (and, when torch is installed, on PyTorch): GFLOP/s of the
forward pass, the input gradient and the kernel gradient.

    python scripts/benchmark_conv.py                         # 32 x 32x32x64 -> 64
    taskset -c 0 python scripts/benchmark_conv.py --torch_threads=1
    python scripts/benchmark_conv.py --batch=16 --size=16 --channels=128 --features=128

The network benchmarks (`benchmark.py`, `compare_reference.py`) say how fast a step is; this
says how fast the operation that dominates it is, which bounds them. Each line is a JSON
object with the median of `--runs` calls after a warm-up, 2 B H W 9 C_in C_out FLOPs per
call.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from score_sde.run import cli, timing

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "Batch size.", lower_bound=1)
flags.DEFINE_integer("size", 32, "Image height = width.", lower_bound=1)
flags.DEFINE_integer("channels", 64, "Input channels.", lower_bound=1)
flags.DEFINE_integer("features", 64, "Output channels.", lower_bound=1)
flags.DEFINE_integer("runs", 10, "Timed calls (median).", lower_bound=1)
flags.DEFINE_integer("torch_threads", os.cpu_count(), "Threads of the torch runs.",
                     lower_bound=1)


def main(argv) -> None:
  del argv
  b, h, c, o = FLAGS.batch, FLAGS.size, FLAGS.channels, FLAGS.features
  flops = 2 * b * h * h * 9 * c * o
  base = {"batch": b, "size": h, "channels": c, "features": o}

  def report(framework: str, op: str, seconds: float, **extra) -> None:
    print(json.dumps({**base, "framework": framework, "op": op, **extra,
                      "ms": round(seconds * 1e3, 3),
                      "gflops_per_s": round(flops / seconds / 1e9, 1)}), flush=True)

  x = jax.random.normal(jax.random.key(0), (b, h, h, c))
  w = jax.random.normal(jax.random.key(1), (3, 3, c, o)) * 0.05
  dy = jax.random.normal(jax.random.key(2), (b, h, h, o))

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  programs = {
      "forward": (jax.jit(conv), (x, w)),
      "input_gradient": (jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]),
                         (x, w, dy)),
      "kernel_gradient": (jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]),
                          (x, w, dy)),
  }
  for op, (fn, fn_args) in programs.items():
    seconds = timing.median_seconds(lambda: fn(*fn_args), FLAGS.runs)
    report(f"jax {jax.__version__}", op, seconds, devices=1)

  try:
    import torch
    import torch.nn.grad
  except ImportError:
    return
  torch.set_num_threads(FLAGS.torch_threads)
  tx, tw, tdy = torch.randn(b, c, h, h), torch.randn(o, c, 3, 3) * 0.05, torch.randn(b, o, h, h)
  calls = {
      "forward": lambda: torch.nn.functional.conv2d(tx, tw, padding=1),
      "input_gradient": lambda: torch.nn.grad.conv2d_input(tx.shape, tw, tdy, padding=1),
      "kernel_gradient": lambda: torch.nn.grad.conv2d_weight(tx, tw.shape, tdy, padding=1),
  }
  with torch.no_grad():
    for op, call in calls.items():
      report(f"torch {torch.__version__}", op, timing.median_seconds(call, FLAGS.runs),
             threads=torch.get_num_threads())


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
