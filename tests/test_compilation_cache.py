"""The persistent compilation cache: where it lives, how it is turned off, and that a second
process loads the first one's programs instead of compiling them."""

import json
import logging
import os
import subprocess
import sys

import diffrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from score_sde import likelihood, models, sampling, sde as sde_lib, solvers
from score_sde.io import compilation_cache
from score_sde.run import experiment, programs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process that turns the cache on, compiles one program and prints which cache
# events JAX reported (hits or misses).
_CHILD = """
import sys

import pytest
import jax, jax.numpy as jnp
from score_sde.io import compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
print("dir", compilation_cache.enable(min_compile_time_secs=0))
jax.jit(lambda x: jnp.tanh(x) @ x.T + 2.0)(jnp.ones((8, 8))).block_until_ready()
print("hits", sum(e.endswith("/cache_hits") for e in events))
print("misses", sum(e.endswith("/cache_misses") for e in events))
"""


def test_default_and_override_and_off():
  home = os.path.expanduser("~")
  assert compilation_cache.cache_dir_from_env({}) == os.path.join(
      home, ".cache", "score_sde", "jax")
  assert compilation_cache.cache_dir_from_env({"SCORE_SDE_CACHE_DIR": "/x/y"}) == "/x/y"
  assert compilation_cache.cache_dir_from_env({"SCORE_SDE_CACHE_DIR": ""}) is None
  assert compilation_cache.cache_dir_from_env({"SCORE_SDE_CACHE_DIR": "  "}) is None
  assert compilation_cache.enable(environ={"SCORE_SDE_CACHE_DIR": ""}) is None


def test_unwritable_directory_warns_and_runs_without(tmp_path, caplog):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with caplog.at_level(logging.WARNING):
    assert compilation_cache.enable(str(blocker / "cache")) is None
  assert "cannot be written" in caplog.text and "SCORE_SDE_CACHE_DIR" in caplog.text


def _child(env_dir: str) -> dict:
  env = dict(os.environ, SCORE_SDE_CACHE_DIR=env_dir, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout
  return dict(line.split(" ", 1) for line in out.strip().splitlines())


def test_second_process_loads_the_compiled_program(tmp_path):
  cache = tmp_path / "cache"
  first = _child(str(cache))
  assert first["dir"] == str(cache)
  assert int(first["hits"]) == 0 and int(first["misses"]) >= 1
  assert any(cache.iterdir()), "nothing was written to the cache"
  second = _child(str(cache))
  assert int(second["hits"]) >= 1 and int(second["misses"]) == 0


def test_empty_variable_turns_the_cache_off_in_a_process(tmp_path):
  out = _child("")
  assert out["dir"] == "None" and int(out["hits"]) == 0


# ----------------------------------------------------------------------------------------
# No host callback in the ODE programs (so they are cached), and a failed solve still fails.

def test_ode_programs_compile_no_callback_and_a_failed_solve_is_a_clear_error():

  sde = sde_lib.VPSDE()
  score_fn = lambda x, t: -x  # noqa: E731 (the exact score of N(0, I) data under VP)
  key = jax.random.PRNGKey(0)
  x = jnp.full((3, 2), 0.5)

  def sample(max_steps, return_result=True):
    return jax.jit(lambda k: sampling.sample(k, score_fn, sde, (3, 2), "ode", rtol=1e-3,
                                             atol=1e-3, max_steps=max_steps,
                                             return_result=return_result))

  def loglik(max_steps):
    return jax.jit(lambda k, x: likelihood.log_likelihood(
        k, score_fn, sde, x, rtol=1e-3, atol=1e-3, max_steps=max_steps, return_result=True))

  # JAX keeps programs with host callbacks out of the persistent cache; these have none
  # (the default, diffrax's run-time check, has one).
  assert "callback" not in sample(2).lower(key).as_text()
  assert "callback" not in loglik(2).lower(key, x).as_text()
  assert "callback" in sample(2, return_result=False).lower(key).as_text()
  # A solve that fits its budget succeeds; one that does not is an error on the host.
  _, nfe, result = sample(4096)(key)
  solvers.check_result(jax.device_get(result))
  assert bool(result == diffrax.RESULTS.successful) and int(nfe) > 2 * 6
  _, _, _, result = loglik(4096)(key, x)
  solvers.check_result(jax.device_get(result))
  failed = (sample(2)(key)[2], loglik(2)(key, x)[3])
  for result in (*failed, solvers.result_code(failed[0])):  # an item or its plain code
    with pytest.raises(RuntimeError, match="the ODE solve failed: The maximum number of "
                                           "solver steps was reached"):
      solvers.check_result(jax.device_get(result))
  # `check_result` knows success by its code, without importing diffrax.
  assert int(solvers.result_code(diffrax.RESULTS.successful)) == solvers.SUCCESSFUL
  solvers.check_result(solvers.result_code(diffrax.RESULTS.successful))
  # The fixed-step samplers cannot fail: they report success.
  _, _, result = jax.jit(lambda k: sampling.sample(k, score_fn, sde, (3, 2), "ddim", steps=3,
                                                   return_result=True))(key)
  solvers.check_result(jax.device_get(result))


def test_run_sampler_raises_on_a_failed_ode_solve():

  class Linear(nn.Module):  # the score networks' calling convention, fast to compile
    @nn.compact
    def __call__(self, x, labels, train=False, class_labels=None):
      return nn.Dense(x.shape[-1])(x) * (1.0 + labels[:, None, None, None] / 999)

  network, sde = Linear(), sde_lib.VPSDE()
  variables = network.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)), jnp.ones((1,)))
  spec = experiment.RunSpec(score_model=models.ScoreModel(network, sde), image_shape=(4, 4, 1),
                            loss_fn=None, optimizer=None, ema_rate=0.9, ema_warmup=False)
  key = jax.random.PRNGKey(1)
  ok = programs.make_sample_fn(spec, (2, 4, 4, 1), "ode", dict(rtol=1e-2, atol=1e-2))
  images, nfe = ok(variables, key)
  assert images.shape == (2, 4, 4, 1) and int(nfe) > 1
  failing = programs.make_sample_fn(spec, (2, 4, 4, 1), "ode", dict(max_steps=2))
  with pytest.raises(RuntimeError, match="the 'ode' sampler's solve failed: The maximum "
                                         "number of solver steps was reached"):
    failing(variables, key)


# ----------------------------------------------------------------------------------------
# Every program of train, eval (with bits/dim) and sample (every method) from the cache.

# A child process: the cache on for every program (no compile-time threshold), then a tiny
# train run, its eval with bits/dim, and a sample with every method, as `main` runs them;
# prints the programs JAX compiled (cache misses), loaded (hits) and would not store.
_RUNS = r"""
import json, logging, re, sys
from score_sde.io import compilation_cache
compilation_cache.enable(min_compile_time_secs=0)
names = dict(hit=[], miss=[], not_stored=[])
PATTERNS = dict(hit="Persistent compilation cache hit for '([^']+)'",
                miss="PERSISTENT COMPILATION CACHE MISS for '([^']+)'",
                not_stored="Not writing persistent cache entry for '([^']+)' because it uses")
class Spy(logging.Handler):
  def emit(self, record):
    for kind, pattern in PATTERNS.items():
      m = re.match(pattern, record.getMessage())
      if m:
        names[kind].append(m.group(1))
log = logging.getLogger("jax._src.compiler")
log.setLevel(logging.DEBUG)
log.addHandler(Spy())

import jax
from configs import fashion_mnist_vp
from score_sde import main, sampling
from score_sde.run import experiment, programs
TINY = {"data.dataset": "synthetic", "data.image_size": 8, "model.ch_mult": (1,),
        "model.attn_resolutions": (), "model.nf": 4, "training.batch_size": 2,
        "eval.batch_size": 2, "sampling.batch_size": 2, "sampling.steps": 2,
        "training.n_iters": 1, "training.snapshot_freq": 1, "training.eval_freq": 1,
        "training.snapshot_sampling": False, "sampling.rtol": 1e-2, "sampling.atol": 1e-2,
        "eval.enable_bpd": True, "eval.bpd_num_examples": 2, "eval.bpd_rtol": 1e-2,
        "eval.bpd_atol": 1e-2}
def config(**overrides):
  c = fashion_mnist_vp.get_config("tiny")
  for path, value in {**TINY, **overrides}.items():
    section, field = path.split(".")
    c[section][field] = value
  return c
workdir = sys.argv[1]
main.run(config(), workdir, "train")
main.run(config(), workdir, "eval")
for method in sampling.SAMPLERS:
  if method != "unipc":  # the sde sampler's `solver` (euler / heun) shares the ODE's field
    extra = {"sampling.solver": "euler"} if method == "sde" else {}
    main.run(config(**{"sampling.method": method, **extra}), workdir, "sample", num_samples=2)
# diffrax is imported only where a solve is built: a process that loads every sampler and
# the bits/dim program from their stored executables never imports it.
names["diffrax"] = "diffrax" in sys.modules
# unipc: its bool `corrector` clashes with the config's pc corrector name; not stored.
run = programs.restore_run(config(), workdir)
programs.make_sample_fn(run.spec, (2, 8, 8, 1), "unipc", dict(steps=2))(
    run.state.variables(), jax.random.PRNGKey(0))
print(json.dumps(names))
"""


@pytest.mark.slow
def test_second_process_loads_every_program_of_train_eval_and_sample(tmp_path):
  env = dict(os.environ, SCORE_SDE_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  # One device, as a user's first run on a CPU; XLA's optimization flags of the test
  # processes (tests/conftest.py: they halve compile times). Which programs are cached does
  # not depend on them: the flags are one part of every program's cache key.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

  def runs(workdir):
    out = subprocess.run([sys.executable, "-c", _RUNS, str(workdir)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

  first = runs(tmp_path / "first")
  assert first["not_stored"] == [] and first["hit"] == [] and first["diffrax"]
  # The ODE sampler and the likelihood, the train and eval steps among them.
  compiled = set(first["miss"])
  assert {"jit_flat_step", "jit_eval_fn", "jit_pixel_bpd_fn", "jit_sample_fn"} <= compiled, \
      compiled
  second = runs(tmp_path / "second")  # a fresh workdir: the same programs again
  assert second["miss"] == [] and second["not_stored"] == [] and not second["diffrax"]
  # The train step, the bits/dim program and the CLI's samplers come from their stored
  # executables (io.executable_cache), not traced, so JAX's cache sees only the rest
  # (unipc's sampler, made here without a description, among them), less the eager op that
  # tracing the bits/dim solve runs (`jit_bitwise_or`, on diffrax's result codes).
  missing = compiled - set(second["hit"])
  assert set(second["hit"]) <= compiled
  assert {"jit_flat_step", "jit_pixel_bpd_fn"} <= missing
  assert missing <= {"jit_flat_step", "jit_pixel_bpd_fn", "jit_bitwise_or"}, missing
  stored = os.listdir(tmp_path / "cache" / "score_sde_executables")
  # The train step, bits/dim and every CLI sampler.
  assert len(stored) == 2 + len(sampling.SAMPLERS) - 1, stored
