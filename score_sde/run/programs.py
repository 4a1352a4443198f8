"""The compiled programs of a run, and a run loaded from its directory.

Every program is built from an `experiment.RunSpec` (the network with its process and
parameterization, the loss, the optimizer, EMA, labels and data scaling), never from a config:

- `TrainState`: step, params, optimizer state, EMA params, and the network's frozen
  `constants` (e.g. NCSN++'s Gaussian Fourier features), one pytree that is checkpointed and
  replicated over devices; `init_state`, `abstract_state`, `restore_state`.
- `make_train_step`: `n_jitted_steps` optimizer steps in one compiled call (`lax.scan`;
  unrolled on CPU, where XLA runs a network inside a loop several times slower), over
  a device mesh with a `"batch"` axis: the batch is sharded, the state replicated, and XLA
  all-reduces the gradients (the `jit` + `NamedSharding` form of `pmap`). The per-step key is
  `fold_in(base_key, step)` inside the compiled code, so a run's randomness depends only on
  (seed, step), not on how it was cut into calls or devices.
- `make_eval_loss_fn`, `make_sample_fn`: the test loss and a sampler, compiled once, their
  batch sharded over devices.
- `load_run(workdir)` -> `Run`: a trained run's config, step, `ScoreModel` and variables, the
  one way from a directory to a score function.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from score_sde import guidance, models, sampling, solvers
from score_sde.io import checkpoints, executable_cache, parallel, shape_cache
from score_sde.io import workdir as workdir_lib
from score_sde.run import experiment, keys
from score_sde.run import latent as latent_lib
from score_sde.run.experiment import RunSpec

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue, as one pytree.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the network's trainable parameters.
    opt_state: the optax optimizer state.
    ema_params: exponential moving average of `params` (rate `config.model.ema_rate`); the
      weights used for evaluation and sampling.
    constants: the network's other variable collections (frozen arrays, not trained).
  """
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any
  constants: Any

  def variables(self, ema: bool = True) -> dict:
    """The variables for `model.apply`: EMA (default) or raw params plus the constants."""
    return {"params": self.ema_params if ema else self.params, **self.constants}


# ----------------------------------------------------------------------------------------
# State and step.


def init_state(key: Array, spec: RunSpec) -> TrainState:
  """A fresh `TrainState` of `spec`'s network and optimizer: initialized params, EMA =
  params, step 0. Usable under `jax.eval_shape`."""
  variables = models.init_network(key, spec.model, spec.image_shape)
  params = variables.pop("params")
  ema_params = jax.tree_util.tree_map(jnp.copy, params)  # own buffers: the state is donated
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=spec.optimizer.init(params), ema_params=ema_params,
                    constants=variables)


def make_train_step(spec: RunSpec, *, mesh: Mesh | None = None,
                    stored_as: str | None = None) -> Callable:
  """Builds the compiled multi-step train function.

  Args:
    spec: the run's SDE, network, loss, optimizer, EMA rate (and warmup: decay
      min(ema_rate, (1 + step) / (10 + step)), so that a short run's EMA weights are not
      dominated by the initialization: with 0.995 and no warmup, 8% of the EMA is still the
      random initial network after 500 steps), time labels, class labels and data scaling
      (applied inside the compiled step); its schedule only to report the learning rate.
    mesh: device mesh with axis `"batch"` (default: all devices).

  Returns:
    `step_fn(state, base_key, batch) -> (state, metrics)`: `batch` is a dict of `image
    [n, B, H, W, C]` in [0, 1] and `label [n, B]` (n steps, global batch B, sharded over
    `"batch"` on axis 1); `metrics` holds `[n]` arrays `loss`, `grad_norm`, `lr`. The input
    state is donated.
    With `stored_as` (a description of everything else the step depends on: the caller's
    whole config, say; `experiment.program_description`), `step_fn` is not a `jax.jit`
    function but calls its executable stored by `stored_program`, one per state tree, so a
    warm start does not trace it; None, or a latent run: not stored.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  optimizer, scaler = spec.optimizer, spec.scaler
  score_model = spec.score_model_for("train")  # params, opt_state, EMA stay float32

  def one_step(base_key, state: TrainState, batch):
    key = jax.random.fold_in(base_key, state.step)
    k_loss, k_dropout = jax.random.split(key)
    labels = batch["label"] if spec.conditional else None
    if labels is not None and spec.label_dropout > 0:  # classifier-free guidance training
      labels = guidance.drop_labels(jax.random.fold_in(key, keys.LABEL_DROPOUT), labels,
                                    spec.label_dropout, spec.num_classes)

    def param_score_fn(params, x, t):
      variables = {"params": params, **state.constants}
      return score_model.score_fn(variables, train=True, rng=k_dropout,
                                  class_labels=labels)(x, t)

    def objective(params):
      return spec.loss_fn(k_loss, param_score_fn, params, scaler(batch["image"]))

    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rate = spec.ema_rate
    if spec.ema_warmup:  # min(rate, (1 + n) / (10 + n)): early steps forget the initialization
      n = state.step.astype(jnp.float32)
      rate = jnp.minimum(spec.ema_rate, (1.0 + n) / (10.0 + n))
    ema = jax.tree_util.tree_map(lambda e, p: rate * e + (1.0 - rate) * p,
                                 state.ema_params, params)
    lr = spec.schedule(state.step) if spec.schedule is not None else jnp.nan
    metrics = dict(loss=loss, grad_norm=optax.global_norm(grads),
                   lr=jnp.asarray(lr, jnp.float32))
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                          ema_params=ema)
    return state, metrics

  # XLA:CPU runs a network inside a while loop several times slower than the same network
  # outside one (measured: Fashion-MNIST DDPM++, batch 64, 9 s vs 1.5 s per step), so on CPU
  # the steps are unrolled in Python (compile time grows with n_jitted_steps instead; even
  # `lax.scan(unroll=True)` keeps a one-trip loop).
  unrolled = jax.default_backend() == "cpu"

  def step_fn(state, base_key, batch):
    if not unrolled:
      return jax.lax.scan(functools.partial(one_step, base_key), state, batch)
    per_step = []
    for i in range(jax.tree_util.tree_leaves(batch)[0].shape[0]):
      state, metrics = one_step(base_key, state, jax.tree_util.tree_map(lambda a: a[i], batch))
      per_step.append(metrics)
    return state, jax.tree_util.tree_map(lambda *m: jnp.stack(m), *per_step)

  replicated = NamedSharding(mesh, P())
  jit = functools.partial(jax.jit, in_shardings=(replicated, replicated, NamedSharding(
      mesh, P(None, "batch"))), out_shardings=(replicated, replicated), donate_argnums=0)
  if spec.latent is None and stored_as is not None:
    return _stored_train_step(step_fn, jit, f"train_step {stored_as}")
  compiled = jit(step_fn)
  if spec.latent is None:
    return compiled
  # A latent run: the pixel batch of each call is encoded first (one more compiled program,
  # the autoencoder's weights its argument), keyed by the steps it serves.
  encode = spec.latent.make_encode_fn(mesh, steps_axis=True)

  def latent_step_fn(state, base_key, batch):
    latents = encode(base_key, state.step, batch["image"])
    return compiled(state, base_key, {**batch, "image": latents})

  return latent_step_fn


def _stored_train_step(step_fn: Callable, jit: Callable, description: str) -> Callable:
  """`step_fn(state, base_key, batch)` through `stored_program`, compiled by `jit` (the
  plain step's `jax.jit` with its shardings and donation): the stored executable takes and
  returns the state's leaves as a plain tuple (a `TrainState` tree does not survive the
  executable's pickle), one program per state tree (named in its key)."""
  programs: dict[Any, Callable] = {}

  def call(state, base_key, batch):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    program = programs.get(treedef)
    if program is None:
      def flat_step(leaves, base_key, batch):
        new, metrics = step_fn(jax.tree_util.tree_unflatten(treedef, leaves), base_key, batch)
        return tuple(jax.tree_util.tree_leaves(new)), metrics

      program = programs[treedef] = stored_program(jit(flat_step),
                                                   f"{description} state={treedef}")
    new_leaves, metrics = program(tuple(leaves), base_key, batch)
    return jax.tree_util.tree_unflatten(treedef, new_leaves), metrics

  return call


def make_eval_loss_fn(spec: RunSpec, *, mesh: Mesh | None = None) -> Callable:
  """`eval_fn(variables, key, batch) -> (loss_sum, count)` on one sharded batch (`image
  [B, ...]` in [0, 1], `label [B]`, optional `mask [B]`), network in eval mode (no
  dropout), at `spec.eval_precision`."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  score_model = spec.score_model_for("eval")

  def eval_fn(variables, key, batch):
    labels = batch["label"] if spec.conditional else None

    def param_score_fn(params, x, t):
      return score_model.score_fn({**variables, "params": params},
                                  class_labels=labels)(x, t)

    _, aux = spec.loss_fn(key, param_score_fn, variables["params"], spec.scaler(batch["image"]))
    mask = batch.get("mask", jnp.ones_like(aux["per_example_loss"], bool))
    return jnp.sum(jnp.where(mask, aux["per_example_loss"], 0.0)), jnp.sum(mask)

  replicated = NamedSharding(mesh, P())
  compiled = jax.jit(eval_fn, in_shardings=(replicated, replicated,
                                            NamedSharding(mesh, P("batch"))),
                     out_shardings=replicated)
  if spec.latent is None:
    return compiled
  encode = spec.latent.make_encode_fn(mesh, steps_axis=False)

  def latent_eval_fn(variables, key, batch):  # encoded with fold_in(key, LATENT, 0)
    return compiled(variables, key, {**batch, "image": encode(key, 0, batch["image"])})

  return latent_eval_fn


def _keep_mesh(score_fn: Callable, sharding: NamedSharding) -> Callable:
  """`score_fn` whose input `x` is constrained to `sharding` when its traced type has lost
  the mesh (e.g. the final state of a diffrax solve, which the denoising step feeds to the
  network), and left alone otherwise. `ScoreModel.apply` traces the network once per input
  type, so without this the same network is traced again (seconds of a start-up) for an
  input that differs from the others only in that."""

  def constrained(x, t):
    if jax.typeof(x).sharding.mesh.empty:
      x = jax.lax.with_sharding_constraint(x, sharding)
    return score_fn(x, t)

  return constrained


def _device_ids(sharding) -> tuple[int, ...]:
  """The devices of `sharding` by id: in the mesh's order for a `NamedSharding`."""
  if isinstance(sharding, NamedSharding):
    return tuple(int(d.id) for d in sharding.mesh.devices.flat)
  return tuple(sorted(int(d.id) for d in sharding.device_set))


def _input_signature(args: tuple) -> str | None:
  """The types of `args` as a compiled program sees them: the tree, and per leaf its shape,
  dtype, weak type, sharding (which names the mesh) and devices. None when a leaf is not a
  `jax.Array` (a Python or NumPy value, whose type jit may treat otherwise)."""
  leaves, treedef = jax.tree_util.tree_flatten(args)
  if not all(isinstance(leaf, jax.Array) for leaf in leaves):
    return None
  types = [(leaf.shape, str(leaf.dtype), jax.typeof(leaf).weak_type, repr(leaf.sharding),
            _device_ids(leaf.sharding)) for leaf in leaves]
  return f"{treedef} {types}"


def stored_program(jitted: Callable, description: str | None) -> Callable:
  """`jitted` (a `jax.jit` function of arrays) called through a compiled executable stored
  beside the compilation cache (`io.executable_cache`, on with it), so that a warm start
  neither traces nor lowers it. `description` must name everything the program depends on
  besides its inputs' types, e.g. the whole config and the program's settings; None (or
  the cache off, or an input that is not a `jax.Array`): `jitted` itself.

  The key of an entry is `description`, the inputs' tree, shapes, dtypes and shardings, and
  `executable_cache.environment()` (code, library versions, XLA flags, jax config, devices).
  A miss lowers and compiles `jitted` (through the persistent compilation cache, as a plain
  call would, and again without it if that cache answered: `executable_cache.compile`) and
  stores the executable; the program's outputs must then be plain tuples,
  dicts and arrays (else it is not stored, and runs as compiled)."""
  if description is None or " at 0x" in description:  # not plain data: never a hit
    return jitted
  loaded: dict[str, Any] = {}  # input signature -> jax.stages.Compiled, for this process

  def call(*args):
    signature = _input_signature(args)
    if signature is None or executable_cache.directory() is None:
      return jitted(*args)
    compiled = loaded.get(signature)
    if compiled is None:
      key = f"{description} inputs={signature} {executable_cache.environment()}"
      compiled = executable_cache.load(key)
      if compiled is None:
        compiled = executable_cache.compile(jitted.lower(*args))  # one that serializes
        executable_cache.save(key, compiled)
      loaded[signature] = compiled
    return compiled(*args)

  return call


def make_sample_fn(spec: RunSpec, shape: tuple[int, ...], method: str, options: dict, *,
                   mesh: Mesh | None = None, score_fn_of: Callable | None = None,
                   variance_fn_of: Callable | None = None, decode: bool = True,
                   stored_as: str | None = None) -> Callable:
  """`sample_fn(variables, key) -> (images [B, H, W, C] in [0, 1], nfe)`, one compiled
  program with the batch `shape[0]` sharded over devices. `method` and `options` as for
  `sampling.sample` (e.g. from `experiment.sampler_settings`). The starting noise is
  `sde.prior_sampling(fold_in(key, keys.PRIOR), shape)`, so calls with the same key but different
  methods start from the same x_T. `score_fn_of(variables) -> score_fn` makes the score
  function from `variables` (any pytree; default: the network's score with the network's
  variables, at `spec.sample_precision`), e.g. a guided one. With ddpm's
  `variance='learned'`, `variance_fn_of(variables) -> var_interp_fn` gives the network's
  variance half (default: `ScoreModel.variance_fn` of the network's variables, no class
  labels). A latent run's samples (`spec.latent`) are drawn in latent space and decoded by
  a second compiled program: the images are in pixel space (`decode=False`: the latents
  themselves). `stored_as`: a description of everything else the program depends on (the
  caller's whole config, say): its executable is then stored (`stored_program`), so a warm
  start does not trace it; None, or a `score_fn_of` / `variance_fn_of` given, or a latent
  run: not stored.

  The compiled program has no host callback (the ODE sampler solves with diffrax's
  `throw=False`), so it is stored in the persistent compilation cache; a failed ODE solve
  (e.g. `max_steps` reached) raises RuntimeError on the host after the call
  (`solvers.check_result`)."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_batch(shape[0], mesh, "sampling batch size")
  batch_sharding = NamedSharding(mesh, P("batch"))
  sde = spec.sde

  if score_fn_of is not None or variance_fn_of is not None or spec.latent is not None:
    stored_as = None  # closes over more than the description names: never stored
  if score_fn_of is None:
    score_fn_of = spec.score_model_for("sample").score_fn
  learned = method == "ddpm" and options.get("variance") == "learned"
  if learned and variance_fn_of is None:
    variance_fn_of = spec.score_model_for("sample").variance_fn

  def sample_fn(variables, key):
    score_fn = _keep_mesh(score_fn_of(variables), batch_sharding)
    x_T = sde.prior_sampling(jax.random.fold_in(key, keys.PRIOR), shape)
    x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    extra = {"var_interp_fn": variance_fn_of(variables)} if learned else {}
    x, nfe, result = sampling.sample(jax.random.fold_in(key, keys.SAMPLER), score_fn, sde, shape,
                                     method=method, x_T=x_T, return_result=True, **options,
                                     **extra)
    if spec.latent is None:
      x = jnp.clip(spec.inverse_scaler(x), 0.0, 1.0)
    return x, nfe, solvers.result_code(result)  # a latent run's latents are decoded below

  compiled = stored_program(jax.jit(sample_fn), None if stored_as is None else (
      f"sample_fn {stored_as} shape={tuple(shape)} method={method!r} "
      f"options={sorted(options.items())!r} decode={decode}"))
  decode_fn = (spec.latent.make_decode_fn(mesh)  # a latent run's samples, decoded to pixels
               if spec.latent is not None and decode else None)

  def checked_sample_fn(variables, key):
    x, nfe, result = compiled(variables, key)
    solvers.check_result(parallel.to_host(result),
                         f"the {method!r} sampler's solve")
    return (x if decode_fn is None else decode_fn(x)), nfe

  return checked_sample_fn


def _variable_shapes(spec: RunSpec) -> dict:
  """The shapes and dtypes of the network's variables (`models.init_network`'s), from the
  shape cache (`io.shape_cache`, on with the compilation cache) when it holds them, else
  by `jax.eval_shape` of the initializer (which traces the whole network), then stored. The
  key: the network's repr (every attribute), the image shape, and this package's code and
  library versions; a network whose repr is not plain data (a memory address in it) is
  never cached."""
  description = repr(spec.model)
  key = None
  if " at 0x" not in description and shape_cache.directory() is not None:
    key = (f"init_network {description} image_shape={tuple(spec.image_shape)} "
           f"code={shape_cache.source_digest()}")
    cached = shape_cache.load(key)
    if cached is not None:
      return cached
  shapes = jax.eval_shape(lambda k: models.init_network(k, spec.model, spec.image_shape),
                          jax.ShapeDtypeStruct((2,), jnp.uint32))  # a key, not made: no compile
  if key is not None:
    shape_cache.save(key, shapes)
  return shapes


def abstract_state(spec: RunSpec, mesh: Mesh) -> TrainState:
  """The `TrainState`'s shapes and dtypes, replicated over `mesh`, without memory: those of
  `init_state`, with the network's from `_variable_shapes` (cached) and the optimizer's by
  `jax.eval_shape` of its init (cheap: no network)."""
  replicated = NamedSharding(mesh, P())
  variables = dict(_variable_shapes(spec))
  params = variables.pop("params")
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(spec.optimizer.init, params),
                      ema_params=params, constants=variables)
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)


# The parts of a TrainState that evaluation and sampling use.
EMA_FIELDS = ("step", "ema_params", "constants")


def restore_state(manager, spec: RunSpec, mesh: Mesh, step: int | None = None, *,
                  ema_only: bool = False) -> tuple[TrainState, int] | None:
  """`(state, step)` from checkpoint `step` (None: the latest), or None if there is none.

  `ema_only`: read only `EMA_FIELDS` (the checkpoint's network and its EMA weights, checked
  by name and shape as a whole restore checks them); `state.params` and `state.opt_state`
  are then None. A third of the arrays, for evaluation and sampling."""
  abstract = abstract_state(spec, mesh)
  if not ema_only:
    return checkpoints.restore(manager, abstract, step)
  target = {name: getattr(abstract, name) for name in EMA_FIELDS
            if jax.tree_util.tree_leaves(getattr(abstract, name))}  # no empty entries
  restored = checkpoints.restore(manager, target, step, partial=True)
  if restored is None:
    return None
  tree, step = restored
  return TrainState(step=tree["step"], params=None, opt_state=None,
                    ema_params=tree["ema_params"],
                    constants=tree.get("constants", abstract.constants)), step


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss; the run stopped without saving."""


def train_loop(state: Any, n_iters: int, take_step: Callable[[Any], tuple[Any, Any]], *,
               manager, writer, log_freq: int, snapshot_freq: int,
               log: Callable[[int, dict], dict], after_step: Callable[[int, Any], None] | None
               = None) -> Any:
  """The loop of the auxiliary trainings (autoencoder, classifier) from `state.step` to
  `n_iters`: one call of `take_step` per step, metrics fetched and logged every `log_freq`
  steps and at the end, a checkpoint every `snapshot_freq` steps and at the end.

  Args:
    state: the state to start from (its `step` field: the steps done).
    take_step: `state -> (state, device metrics {name: scalar})`, one update.
    manager: the orbax manager to save into; waited for and closed on the way out.
    writer: the `MetricsWriter` of the run; closed on the way out.
    log: `(step, {name: float}) -> {name: float}` to write under "train"; raises (e.g.
      NonFiniteLossError) to stop without saving.
    after_step: `(step, state) -> None` after each step's log, before its save (an eval).

  Returns:
    The state after `n_iters` steps.

  Raises:
    checkpoints.CheckpointSaveError: a background save failed (checked every step, and for
      the last save at the end), as in the score-model training.
  """
  step, finished = int(state.step), False
  try:
    while step < n_iters:
      state, metrics = take_step(state)
      step += 1
      checkpoints.check_saves(manager)  # a failed background save stops training now
      if step % log_freq == 0 or step == n_iters:
        metrics = {k: float(v) for k, v in parallel.to_host(metrics).items()}
        writer.scalars(step, "train", log(step, metrics))
      if after_step is not None:
        after_step(step, state)
      if step % snapshot_freq == 0 or step == n_iters:
        checkpoints.save(manager, step, state)
    finished = True
  finally:
    try:
      checkpoints.finish_saves(manager, finished)
    finally:
      writer.close()
  return state


# ----------------------------------------------------------------------------------------
# A run, loaded from its directory.


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run: its config, checkpoint step, spec and state.

  Attributes:
    workdir: the run's directory.
    config: the config the run was trained with (`config.json`) and the overrides.
    step: the checkpoint's step.
    spec: `experiment.run_spec(config)`.
    state: the restored `TrainState` (replicated over the mesh it was restored on).
  """
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  spec: RunSpec
  state: TrainState

  @property
  def score_model(self) -> models.ScoreModel:
    """The network (at `config.sampling.precision`) with its process and parameterization."""
    return self.spec.score_model_for("sample")

  def variables(self, ema: bool = True) -> dict:
    """The network's variables: the EMA weights (default) or the raw ones."""
    return self.state.variables(ema=ema)

  def score_fn(self, *, ema: bool = True, class_labels: Array | None = None
               ) -> Callable[[Array, Array], Array]:
    """`score_fn(x [B, *D], t [B]) -> [B, *D]` of the run's network (model scale, e.g.
    [-1, 1] if `config.data.centered`)."""
    return self.score_model.score_fn(self.variables(ema), class_labels=class_labels)

  def denoiser(self, *, ema: bool = True, class_labels: Array | None = None
               ) -> Callable[[Array, Array], Array]:
    """`denoise(x, t) -> E[x_0 | x_t]` of the run's network."""
    return self.score_model.denoiser(self.variables(ema), class_labels=class_labels)


def restore_run(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                mesh: Mesh | None = None, *, ema_only: bool = False) -> Run:
  """The `Run` of checkpoint `step` (None: the newest intact one) of `workdir`, built with
  `config` as given (`load_run` reads the run's own config). `ema_only`: restore only the
  EMA weights (`restore_state`); then `run.variables(ema=False)` has no params.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) in `workdir/checkpoints`.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  spec = experiment.run_spec(config, latent_lib.latent_space(config, workdir, mesh=mesh))
  with checkpoints.get_manager(workdir, read_only=True) as manager:
    restored = restore_state(manager, spec, mesh, step, ema_only=ema_only)
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {checkpoints.checkpoint_dir(workdir)}; train "
                            f"first (--mode=train with the same --workdir)")
  state, step = restored
  return Run(workdir=workdir, config=config, step=int(step), spec=spec, state=state)


def _override(text: str) -> tuple[str, Any]:
  """'sampling.method=ode' -> ('sampling.method', 'ode'); values are Python literals where
  they parse as one, else strings."""
  path, sep, value = text.partition("=")
  if not sep or not path.strip():
    raise ValueError(f"An override is 'section.field=value', got {text!r}")
  try:
    return path.strip(), ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    return path.strip(), value.strip()


def load_run(workdir: str, *, step: int | None = None,
             overrides: Sequence[str] | Mapping[str, Any] = (), mesh: Mesh | None = None,
             allow_config_change: bool = False) -> Run:
  """The run in `workdir`, from its `config.json` and checkpoint `step` (None: the newest
  intact one).

  Args:
    workdir: a run directory (trained here, or written by `scripts/import_checkpoint.py`).
    step: the checkpoint step.
    overrides: config fields to change, as `{"sampling.method": "ode"}` or
      `["sampling.method=ode", ...]` (sampling, eval and precision settings; a change of what
      defines the network or the SDE needs `allow_config_change`).
    mesh: the device mesh to restore on (default: all devices).
    allow_config_change: accept overrides of fields that define the network or the SDE.

  Returns:
    A `Run`: `run.score_fn()` is the EMA network's score function.

  Raises:
    FileNotFoundError: no run config or no checkpoint in `workdir`.
    ValueError: an unknown override field, or an override of the network / SDE.
  """
  saved = workdir_lib.load_config(workdir)
  if saved is None:
    raise FileNotFoundError(f"No {workdir_lib.CONFIG_FILE} in {workdir}: not a run directory "
                            f"(train one with --mode=train, or import a checkpoint)")
  config = experiment.config_from_plain(saved)
  items = overrides.items() if isinstance(overrides, Mapping) else map(_override, overrides)
  for path, value in items:
    if not experiment.set_field(config, path, value):
      raise ValueError(f"Unknown config field {path!r} in overrides")
  if not allow_config_change:
    changed = experiment.config_differences(config, saved, experiment.defines_network)
    if changed:
      raise ValueError(f"overrides change what defines the trained network or the SDE: "
                       f"{'; '.join(changed)} (pass allow_config_change=True to use them)")
  return restore_run(config, workdir, step, mesh)
