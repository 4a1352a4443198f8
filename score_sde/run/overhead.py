"""Per-NFE cost of every sampler against a bare call of the score network.

A sampler's whole loop is one compiled program; its overhead is what it costs per score
evaluation beyond the network itself (the update arithmetic, the loop, the solver's step-size
control). `sampler_overhead` measures, on a config's network (randomly initialized: the cost
does not depend on the weights, only the adaptive ODE's NFE does) and one batch:

  * the bare score call `score_fn(x, t)`, jitted alone (median of `runs` calls);
  * each sampler (`sampling.sample` with `steps` for the fixed-step ones, rtol = atol =
    `ode_tol` for the ODE), compiled once, median of `runs` calls; per NFE and as a ratio to
    the bare call (1.0: no overhead).

Used by `scripts/sampler_overhead.py` and `scripts/gpu_benchmark.sh`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from score_sde import sampling, solvers
from score_sde.checks import check_choice
from score_sde.run import experiment, networks, timing


def sampler_options(method: str, steps: int, ode_tol: float) -> dict:
  """The options each method is timed with: `steps` (fixed-step methods), or the ODE's
  adaptive tolerances."""
  if method == "ode":
    return dict(rtol=ode_tol, atol=ode_tol)
  return dict(steps=steps)


def sampler_overhead(config: ml_collections.ConfigDict, *, batch_size: int, steps: int = 10,
                     methods: Sequence[str] | None = None, ode_tol: float = 1e-3,
                     runs: int = 5) -> Iterator[dict]:
  """Yields one dict for the bare score call, then one per sampler, as they are measured.

  Raises:
    ValueError: an unknown method (before anything compiles), steps or batch_size < 1.
  """
  methods = list(sampling.SAMPLERS) if methods is None else list(methods)
  for method in methods:
    check_choice("sampling method", method, tuple(sampling.SAMPLERS))
  if steps < 2 or batch_size < 1:
    raise ValueError(f"steps must be >= 2 (heun) and batch_size >= 1, got steps={steps}, "
                     f"batch_size={batch_size}")
  spec = experiment.run_spec(config)
  sde, score_model = spec.sde, spec.score_model_for("sample")
  for method in methods:  # every option set valid before anything compiles
    sampling.check_options(sde, method, sampler_options(method, steps, ode_tol))
  variables = jax.jit(lambda k: networks.init_model(k, config))(jax.random.key(0))
  shape = (batch_size, *spec.image_shape)
  x = jax.random.normal(jax.random.key(1), shape)
  t = jnp.full((batch_size,), 0.5 * (sde.T + sampling.default_eps(sde)))
  base = {"config_model": config.model.name, "batch_size": batch_size,
          "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
          "precision": spec.sample_precision}

  bare_fn = jax.jit(lambda v, x, t: score_model.score_fn(v)(x, t))
  bare, compile_s = timing.compile_timed(bare_fn, variables, x, t)
  bare_s = timing.median_seconds(lambda: bare(variables, x, t), runs)
  yield {**base, "mode": "bare_score", "compile_s": round(compile_s, 3),
         "median_ms": round(1e3 * bare_s, 4)}

  key = jax.random.key(2)
  for method in methods:
    options = sampler_options(method, steps, ode_tol)

    def sample(v, k, method=method, options=options):
      return sampling.sample(k, score_model.score_fn(v), sde, shape, method,
                             return_result=True, **options)

    compiled, compile_s = timing.compile_timed(jax.jit(sample), variables, key)
    _, nfe, result = compiled(variables, key)
    solvers.check_result(jax.device_get(result), f"the {method!r} sampler's solve")
    nfe = int(nfe)
    seconds = timing.median_seconds(lambda: compiled(variables, key), runs)
    yield {**base, "mode": "sampler", "method": method, "options": options, "nfe": nfe,
           "compile_s": round(compile_s, 3), "median_ms": round(1e3 * seconds, 3),
           "ms_per_nfe": round(1e3 * seconds / nfe, 4),
           "per_nfe_over_bare": round(seconds / nfe / bare_s, 3)}
