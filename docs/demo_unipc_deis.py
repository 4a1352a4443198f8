"""unipc and deis on the demo model, from the x_T that scripts/compare_samplers.py draws
(seed 0, 200 samples), FD / KID as its QualityMeter measures them; dpm_solver2 at NFE 10 as
the anchor against docs/demo_compare_samplers.md. No reference solve, no bare-score timing.

    PYTHONPATH=$PWD python docs/demo_unipc_deis.py WORKDIR [NAME:NFE ...]
"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from score_sde import sampling
from score_sde.run import compare

options = compare.CompareOptions(problem="checkpoint", workdir=sys.argv[1], num_samples=200)
problem = compare.build_problem(options)
sde, score_fn, n = problem.sde, problem.score_fn, options.num_samples
shape = (n,) + tuple(problem.event_shape)
eps = sampling.default_eps(sde)
k_prior, k_sample, _, _, _ = jax.random.split(jax.random.PRNGKey(options.seed), 5)
x_T = jax.jit(lambda k: sde.prior_sampling(k, shape).astype(jnp.float32))(k_prior)
meter = compare.QualityMeter(problem.run, n, options.seed)
print(json.dumps(dict(step=problem.run.step, fd_floor=meter.floor[0], kid_floor=meter.floor[1])), flush=True)
runs = [(a.split(":")[0], int(a.split(":")[1])) for a in sys.argv[2:]] or [
    ("dpm_solver2", 10), ("unipc", 10), ("deis", 10), ("unipc", 25), ("deis", 25)]
for name, nfe in runs:  # NAME:NFE arguments, e.g. unipc:50 deis:50
  spec = compare.SAMPLER_GRID[name]
  o = dict(spec.options, steps=spec.steps_for_nfe(nfe), grid="log_snr")
  start = time.time()
  fn = jax.jit(lambda k, x, spec=spec, o=o: sampling.sample(k, score_fn, sde, shape, spec.method, x_T=x, eps=eps, **o))
  x, got = fn(k_sample, x_T)
  fd, kid = meter(np.asarray(x, np.float64))
  print(json.dumps(dict(sampler=name, options=o, nfe=int(got), fd=fd, kid=kid,
                        seconds_with_compile=time.time() - start)), flush=True)
