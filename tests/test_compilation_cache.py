"""The persistent compilation cache: where it lives, how it is turned off, and that a second
process loads the first one's programs instead of compiling them."""

import logging
import os
import subprocess
import sys

from score_sde.io import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process that turns the cache on, compiles one program and prints which cache
# events JAX reported (hits or misses).
_CHILD = """
import sys
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
