"""What a warm start skips: the network's shapes from the shape cache instead of a trace of
its initializer (`io.shape_cache`, `programs.abstract_state`), and, for evaluation and
sampling, the raw params and the optimizer state of the checkpoint (`ema_only`)."""

from __future__ import annotations

import os

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from configs import fashion_mnist_vp
from score_sde.io import checkpoints, executable_cache, parallel, shape_cache
from score_sde.run import experiment, programs


def _spec(**model):
  config = fashion_mnist_vp.get_config("tiny")
  for field, value in model.items():
    config.model[field] = value
  return experiment.run_spec(config)


def _described(tree):
  """Structure, and per leaf shape, dtype and sharding, of an abstract tree."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, [(a.shape, a.dtype, a.sharding) for a in leaves]


def _traced(spec, mesh):
  """The abstract state as it was made before the cache: eval_shape of the whole init."""
  shapes = jax.eval_shape(lambda k: programs.init_state(k, spec),
                          jax.ShapeDtypeStruct((2,), jnp.uint32))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  where = str(tmp_path / "shapes")
  monkeypatch.setattr(shape_cache, "directory", lambda: where)
  return where


def test_abstract_state_from_the_cache_is_the_traced_one(cache_dir, monkeypatch):
  spec, mesh = _spec(), parallel.make_mesh()
  expected = _described(_traced(spec, mesh))
  assert _described(programs.abstract_state(spec, mesh)) == expected  # traced, then stored
  assert len(os.listdir(cache_dir)) == 1

  def no_trace(*args, **kwargs):
    raise AssertionError("the initializer was traced although its shapes are stored")

  monkeypatch.setattr(programs.models, "init_network", no_trace)
  assert _described(programs.abstract_state(spec, mesh)) == expected  # from the cache


def test_another_network_is_not_read_from_the_entry_of_the_first(cache_dir):
  mesh = parallel.make_mesh()
  programs.abstract_state(_spec(), mesh)
  other = _spec(nf=2 * fashion_mnist_vp.get_config("tiny").model.nf)
  assert _described(programs.abstract_state(other, mesh)) == _described(_traced(other, mesh))
  assert len(os.listdir(cache_dir)) == 2


def test_an_unreadable_entry_is_traced_again(cache_dir):
  spec, mesh = _spec(), parallel.make_mesh()
  programs.abstract_state(spec, mesh)
  (entry,) = os.listdir(cache_dir)
  with open(os.path.join(cache_dir, entry), "wb") as f:
    f.write(b"\xff not json")
  assert _described(programs.abstract_state(spec, mesh)) == _described(_traced(spec, mesh))


def test_round_trip_keeps_shapes_and_dtypes(cache_dir):
  tree = {"params": {"w": jax.ShapeDtypeStruct((3, 2), jnp.bfloat16),
                     "b": jnp.zeros((2,), jnp.float32)},
          "constants": {"W": jax.ShapeDtypeStruct((), jnp.int32)}}
  assert shape_cache.load("k") is None
  shape_cache.save("k", tree)
  assert shape_cache.load("k") == {
      "params": {"w": jax.ShapeDtypeStruct((3, 2), jnp.bfloat16),
                 "b": jax.ShapeDtypeStruct((2,), jnp.float32)},
      "constants": {"W": jax.ShapeDtypeStruct((), jnp.int32)}}
  assert shape_cache.load("another key") is None


def test_shape_cache_off_with_the_compilation_cache():
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert shape_cache.directory() is None
    shape_cache.save("k", {"w": jax.ShapeDtypeStruct((1,), jnp.float32)})  # nothing, no error
    assert shape_cache.load("k") is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


# ---------------------------------------------------------------------------------------
# Restoring the EMA weights alone (evaluation and sampling).


def _saved(tmp_path):
  w = {"Conv_0": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)},
       "Dense_0": {"kernel": jnp.full((3, 2), 2.0)}}
  state = {"step": jnp.asarray(7, jnp.int32), "params": w,
           "opt_state": {"mu": jax.tree_util.tree_map(jnp.zeros_like, w)},
           "ema_params": jax.tree_util.tree_map(lambda a: a + 1, w)}
  with checkpoints.get_manager(tmp_path) as manager:
    checkpoints.save(manager, 7, state)
  return state


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def test_partial_restore_reads_the_ema_weights_as_saved(tmp_path):
  state = _saved(tmp_path)
  target = _abstract({"step": state["step"], "ema_params": state["ema_params"]})
  with checkpoints.get_manager(tmp_path, read_only=True) as manager:
    restored, step = checkpoints.restore(manager, target, partial=True)
  assert step == 7 and sorted(restored) == ["ema_params", "step"]
  assert jax.tree_util.tree_structure(restored["ema_params"]) == \
      jax.tree_util.tree_structure(state["ema_params"])
  for got, want in zip(jax.tree_util.tree_leaves(restored),
                       jax.tree_util.tree_leaves({"ema_params": state["ema_params"],
                                                  "step": state["step"]})):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("change", ["shape", "fewer", "more"])
def test_partial_restore_refuses_another_network(tmp_path, change):
  state = _saved(tmp_path)
  ema = jax.tree_util.tree_map(lambda a: a, state["ema_params"])
  if change == "shape":
    ema["Dense_0"]["kernel"] = jnp.zeros((4, 2))
  elif change == "fewer":  # the checkpoint holds a layer the network lacks
    del ema["Dense_0"]
  else:  # the network has a layer the checkpoint lacks
    ema["Dense_1"] = {"kernel": jnp.zeros((2, 2))}
  target = _abstract({"step": state["step"], "ema_params": ema})
  with checkpoints.get_manager(tmp_path, read_only=True) as manager:
    with pytest.raises(checkpoints.CheckpointMismatchError, match="another network"):
      checkpoints.restore(manager, target, partial=True)


def _small_config():
  """The demo's config with its network shrunk to one resolution of 8x8 without attention:
  the tests on it compile programs of the network, and what they check does not depend on
  its size."""
  config = fashion_mnist_vp.get_config("tiny")
  config.data.image_size = 8
  config.model.update(nf=4, ch_mult=(1,), attn_resolutions=())
  return config


def test_ema_only_run_has_the_full_runs_ema_variables(tmp_path):
  config = _small_config()
  spec, mesh = experiment.run_spec(config), parallel.make_mesh()
  state = programs.init_state(jax.random.PRNGKey(0), spec)
  state = state.replace(ema_params=jax.tree_util.tree_map(lambda a: a + 1, state.params))
  with checkpoints.get_manager(tmp_path) as manager:
    checkpoints.save(manager, 3, state)
  full = programs.restore_run(config, str(tmp_path), mesh=mesh)
  ema = programs.restore_run(config, str(tmp_path), mesh=mesh, ema_only=True)
  assert ema.step == full.step == 3 and ema.state.params is None
  assert ema.state.opt_state is None
  want, got = full.variables(ema=True), ema.variables(ema=True)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert a.dtype == b.dtype and a.sharding == b.sharding
    np.testing.assert_array_equal(a, b)


def test_partial_restore_reads_names_the_slow_way_from_another_metadata_layout(
    tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoints, "_saved_names", lambda directory, step: None)
  state = _saved(tmp_path)
  target = _abstract({"step": state["step"], "ema_params": state["ema_params"]})
  with checkpoints.get_manager(tmp_path, read_only=True) as manager:
    restored, _ = checkpoints.restore(manager, target, partial=True)
    np.testing.assert_array_equal(restored["ema_params"]["Dense_0"]["kernel"],
                                  state["ema_params"]["Dense_0"]["kernel"])
    del target["ema_params"]["Dense_0"]
    with pytest.raises(checkpoints.CheckpointMismatchError, match="another network"):
      checkpoints.restore(manager, target, partial=True)


# ---------------------------------------------------------------------------------------
# Compiled executables stored beside the compilation cache (`io.executable_cache`,
# `programs.stored_program`): a warm sampler neither traces nor lowers.

_ODE = dict(rtol=1e-2, atol=1e-2)


@pytest.fixture
def executables(tmp_path):
  """A fresh, empty compilation cache (and so executable cache) for the test: a program is
  compiled afresh, which `executable_cache.compile` requires to store it."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
  jax_compilation_cache.reset_cache()
  try:
    yield executable_cache.directory()
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
    jax_compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def tiny_run():
  config = _small_config()
  spec = experiment.run_spec(config)
  variables = programs.init_state(jax.random.PRNGKey(0), spec).variables()
  return spec, (2, *spec.image_shape), variables


class _Traces:
  """Counts jaxpr traces (JAX's `/jax/core/compile/jaxpr_trace_duration` events)."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, name, *args, **kwargs):
    if name == "/jax/core/compile/jaxpr_trace_duration":
      self.count += 1


_TRACES = _Traces()


def _sample(spec, shape, variables, stored_as, method="ode", options=_ODE):
  """Samples of a fresh `make_sample_fn` (its in-process executables not yet loaded), and
  the traces it took."""
  before = _TRACES.count
  sample_fn = programs.make_sample_fn(spec, shape, method, options, stored_as=stored_as)
  x, nfe = sample_fn(variables, jax.random.PRNGKey(1))
  return np.asarray(x), int(nfe), _TRACES.count - before


def test_a_stored_sampler_gives_the_same_bytes_without_tracing(executables, tiny_run):
  spec, shape, variables = tiny_run
  first, first_nfe, traces = _sample(spec, shape, variables, "tiny")  # a miss: compiled, stored
  assert traces > 0 and len(os.listdir(executables)) == 1
  traced, nfe, traces = _sample(spec, shape, variables, None)  # no store: jit as before
  assert traces > 0 and len(os.listdir(executables)) == 1
  second, second_nfe, traces = _sample(spec, shape, variables, "tiny")  # loaded
  assert traces == 0
  assert traced.tobytes() == first.tobytes() == second.tobytes()
  assert nfe == first_nfe == second_nfe > 0


def test_a_stored_train_step_gives_the_same_state_without_tracing(executables, tiny_run):
  """`make_train_step(stored_as=...)`: the state bit for bit as the plain `jax.jit` step's,
  and a fresh step function of the same description loads the executable instead of
  tracing; the donated input state is consumed as by the jitted step."""
  spec = tiny_run[0]
  mesh = parallel.make_mesh()
  images = jax.random.uniform(jax.random.PRNGKey(2), (1, 4, *spec.image_shape))
  batch = parallel.shard_batch({"image": images, "label": jnp.zeros((1, 4), jnp.int32)}, mesh,
                               axis=1)
  key = parallel.replicate(jax.random.PRNGKey(3), mesh)

  def steps(stored_as):
    state = parallel.replicate(programs.init_state(jax.random.PRNGKey(0), spec), mesh)
    given = jax.tree_util.tree_leaves(state)
    step_fn = programs.make_train_step(spec, mesh=mesh, stored_as=stored_as)
    before = _TRACES.count
    state, metrics = step_fn(state, key, batch)
    assert all(leaf.is_deleted() for leaf in given)  # donated
    return jax.device_get((state, metrics)), _TRACES.count - before

  want, traces = steps(None)
  assert traces > 0 and not os.path.isdir(executables)  # nothing stored
  first, traces = steps("tiny")  # a miss: traced, compiled, stored
  assert traces > 0 and len(os.listdir(executables)) == 1
  second, traces = steps("tiny")  # loaded
  assert traces == 0 and len(os.listdir(executables)) == 1
  assert isinstance(second[0], programs.TrainState) and int(second[0].step) == 1
  for got in (first, second):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_another_description_or_shape_is_a_miss(executables, tiny_run):
  spec, shape, variables = tiny_run
  options = dict(steps=2)
  _sample(spec, shape, variables, "tiny", "ddim", options)
  assert _sample(spec, shape, variables, "tiny", "ddim", options)[2] == 0  # a hit
  # Another description (a changed config): a miss, traced, and stored (the program is the
  # same, so JAX's cache answers and it is compiled again: `executable_cache.compile`).
  want, _, traces = _sample(spec, shape, variables, "tiny changed", "ddim", options)
  assert traces > 0 and len(os.listdir(executables)) == 2
  got, _, traces = _sample(spec, shape, variables, "tiny changed", "ddim", options)
  assert traces == 0 and got.tobytes() == want.tobytes()
  # Another shape, other options, other variables' dtypes: misses, each a new program.
  _, _, traces = _sample(spec, (4, *shape[1:]), variables, "tiny", "ddim", options)
  assert traces > 0 and len(os.listdir(executables)) == 3
  _, _, traces = _sample(spec, shape, variables, "tiny", "ddim", dict(steps=3))
  assert traces > 0 and len(os.listdir(executables)) == 4
  half = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), variables)
  _, _, traces = _sample(spec, shape, half, "tiny", "ddim", options)
  assert traces > 0 and len(os.listdir(executables)) == 5
  assert _sample(spec, shape, variables, "tiny", "ddim", options)[2] == 0  # the first, kept


def test_a_corrupt_entry_is_ignored_and_compiled_again(executables, tiny_run, caplog):
  spec, shape, variables = tiny_run
  options = dict(steps=2)
  want, _, _ = _sample(spec, shape, variables, "tiny", "ddim", options)
  (entry,) = os.listdir(executables)
  path = os.path.join(executables, entry)
  for garbage in (b"\x80\x05 not a pickle", open(path, "rb").read()[:-100]):
    with open(path, "wb") as f:
      f.write(garbage)
    with caplog.at_level("WARNING"):
      got, _, traces = _sample(spec, shape, variables, "tiny", "ddim", options)
    assert "unreadable executable-cache entry" in caplog.text and traces > 0
    assert got.tobytes() == want.tobytes()
    caplog.clear()
  _, _, traces = _sample(spec, shape, variables, "tiny", "ddim", options)  # rewritten
  assert traces == 0


def test_the_environment_names_flags_config_and_devices(monkeypatch):
  base = executable_cache.environment()
  assert shape_cache.source_digest() in base and jax.devices()[0].device_kind in base
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_other=1")
  assert executable_cache.environment() != base
  monkeypatch.undo()
  with jax.default_matmul_precision("highest"):
    assert executable_cache.environment() != base
  assert executable_cache.environment() == base


def test_a_program_with_a_custom_output_node_is_not_stored(executables):
  compiled = jax.jit(lambda x: (x, diffrax.RESULTS.successful)).lower(jnp.ones(2)).compile()
  assert not executable_cache.save("custom node", compiled)
  assert not os.path.exists(executables)
  plain = executable_cache.compile(jax.jit(lambda x: {"y": (x + 1, None)}).lower(jnp.ones(2)))
  assert executable_cache.save("plain", plain)
  loaded = executable_cache.load("plain")
  np.testing.assert_array_equal(loaded(jnp.ones(2))["y"][0], [2.0, 2.0])
  assert executable_cache.load("another key") is None


def test_an_executable_from_jaxs_cache_is_compiled_again_to_be_stored(executables):
  def program():  # a new function each time: not JAX's in-memory caches, its persistent one
    def f(x):
      return jnp.exp(x[:3] * 2.0) * jnp.sin(x[1:4]).sum()
    return jax.jit(f)

  x = jnp.arange(5.0)
  want = program()(x)  # compiled, and written to JAX's cache
  # The same program again: JAX's cache answers, and such an executable would serialize
  # without its kernels; `compile` compiles it again, so the stored one runs.
  assert executable_cache.save("k", executable_cache.compile(program().lower(x)))
  np.testing.assert_array_equal(executable_cache.load("k")(x), want)


def test_executable_cache_off_with_the_compilation_cache(tiny_run):
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert executable_cache.directory() is None
    spec, shape, variables = tiny_run
    _, _, traces = _sample(spec, shape, variables, "tiny", "ddim", dict(steps=2))
    assert traces > 0
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
