"""Samplers compared by accuracy, distribution distance and speed at equal numbers of score
evaluations (NFE), all from the same starting noise x_T (`scripts/compare_samplers.py`).

    rows, summary = run_comparison(CompareOptions(samplers=("ddim", "ode"), nfe=(10, 20)))
    paths = write_results(rows, summary, "runs/compare_samplers")

For each sampler of `SAMPLER_GRID` and each NFE budget it runs
`score_sde.sampling.sample(key, score_fn, sde, shape, method, x_T=x_T, ...)` compiled once
(`jax.jit`), then timed (best of `repeats`, after `block_until_ready`), and measures:

* `rmse_vs_reference`: the pathwise error sqrt(mean((x - x_ref)^2)) over all samples and
  dimensions, against a tight probability-flow ODE solve from the same x_T (`ode`, default
  dopri8 with rtol = atol = 1e-8 in float64). Only meaningful for deterministic samplers (DDIM
  with eta = 0, Heun without churn, DPM-Solver, ODE); None for stochastic ones (DDPM, PC),
  whose outputs depend on their own noise.
* `sliced_w1` (where the data distribution is known, i.e. the mixture problem): the sliced
  Wasserstein-1 distance (`metrics.sliced_wasserstein1`) between the samples and as many fresh
  draws from the mixture. Its finite-sample floor (two independent draws from the truth) is
  in the summary.
* `mode_tv`: `mixtures.mode_weight_tv` of the samples: it catches samplers that get the mode
  weights wrong while each mode looks right.
* `ms_per_sample`, `ms_per_nfe` and `ratio_to_bare_score`: compiled wall time per sample,
  per score evaluation, and the latter divided by the time of one jitted bare `score_fn` call
  on the same batch (best single call; 1.0 = no per-step overhead; below 1 the bare call's
  own dispatch cost dominates, which happens for cheap scores: `score="mlp"` makes the score
  dominate). The summary also gives the bare time per call over a run of 50 calls, which on a
  busy machine sees the same noise as a sampler run.
* `fd` and `kid` (trained runs, `problem="checkpoint"`): the Frechet distance and KID of the
  samples, inverse-scaled to [0, 1], against cached statistics of the run's dataset
  (`config.eval.fid_split`) on the config's feature network; their floor is as many real test
  images against the same statistics.

All samplers return denoised samples (`denoise=True`, their default), and so does the
reference.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import platform
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from score_sde import metrics, mixtures, sampling
from score_sde.checks import check_choice
from score_sde import sde as sde_lib
from score_sde.io import files
from score_sde.run import experiment, pretrained, programs, quality, timing

COLUMNS = ("sampler", "method", "options", "nfe", "ms_per_sample", "ms_per_nfe",
           "ratio_to_bare_score", "rmse_vs_reference", "sliced_w1", "mode_tv", "fd", "kid")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """One line of the comparison: a sampling method with fixed options.

  Attributes:
    method: a method of `score_sde.sampling.sample`.
    options: its fixed keyword options.
    steps_for_nfe: maps an NFE budget to the method's `steps` (None: tolerance-driven ODE).
    deterministic: whether the output is a function of x_T alone (pathwise error defined).
  """
  method: str
  options: tuple[tuple[str, object], ...]
  steps_for_nfe: Callable[[int], int] | None
  deterministic: bool


# NFE per method with denoise=True (see score_sde.sampling): DDIM and DPM-Solver take one
# score evaluation per step plus the final Tweedie step; Heun (EDM) 2 steps - 1; DDPM and
# Euler-Maruyama PC one per step; PC with one Langevin corrector step two per step.
SAMPLER_GRID: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec("ddim", (("eta", 0.0),), lambda n: n - 1, True),
    "heun": SamplerSpec("heun", (("rho", 7.0),), lambda n: (n + 1) // 2, True),
    "dpm_solver2": SamplerSpec("dpm_solver", (("order", 2),), lambda n: n - 1, True),
    "dpm_solver3": SamplerSpec("dpm_solver", (("order", 3),), lambda n: n - 1, True),
    # UniPC-bh2 with the UniC corrector (its evaluation is the next step's) and DEIS (tAB),
    # both order 2 as diffusers' defaults: one evaluation per step + the Tweedie step.
    "unipc": SamplerSpec("unipc", (("order", 2), ("variant", "bh2")), lambda n: n - 1, True),
    "deis": SamplerSpec("deis", (("order", 2),), lambda n: n - 1, True),
    "ddpm": SamplerSpec("ddpm", (), lambda n: n, False),
    "pc_em": SamplerSpec("pc", (("predictor", "euler_maruyama"), ("corrector", "none")),
                         lambda n: n, False),
    "pc_rd_langevin": SamplerSpec(
        "pc", (("predictor", "reverse_diffusion"), ("corrector", "langevin"), ("snr", 0.16),
               ("n_steps", 1)), lambda n: n // 2, False),
    "ode": SamplerSpec("ode", (("solver", "tsit5"),), None, True),
    # The dial dx = [f - (1 + w^2)/2 g^2 s] dt + w g dW, once per value of `CompareOptions.w`
    # (rows `sde_w0`, `sde_w0.5`, ...; pathwise error only at w = 0, where it is the ODE).
    "sde": SamplerSpec("sde", (("solver", "euler"),), lambda n: n - 1, False),
    "sde_heun": SamplerSpec("sde", (("solver", "heun"),), lambda n: (n - 1) // 2, False),
}

# The samplers of `SAMPLER_GRID` run once per value of `CompareOptions.w`.
DIAL_SAMPLERS = ("sde", "sde_heun")

PROBLEMS = ("mixture", "checkpoint")
OWN_GRIDS = "each method's default"  # the summary's grid without CompareOptions.grid
SCORES = ("exact", "mlp")
REFERENCE_DTYPES = ("float64", "float32")


def _image_mixture(event_shape: tuple[int, ...]) -> mixtures.GaussianMixture:
  return mixtures.image_mixture(event_shape=event_shape)


# Mixture problems: name -> constructor of the data mixture from the event shape (the 2-D
# three Gaussians ignore it).
MIXTURES: dict[str, Callable[[tuple[int, ...]], mixtures.GaussianMixture]] = {
    "three_gaussians": lambda event_shape: mixtures.three_gaussians_mixture(),
    "image": _image_mixture,
}


@dataclasses.dataclass(frozen=True)
class CompareOptions:
  """What to compare, and how.

  Attributes:
    problem: 'mixture' (exact score of a Gaussian mixture) or 'checkpoint' (a trained run).
    mixture: a name of `MIXTURES` (problem 'mixture').
    image_shape: event shape of the 'image' mixture.
    sde: a name of `score_sde.sde.SDES` (problem 'mixture'; a run brings its own).
    score: 'exact' (the mixture's score) or 'mlp' (exact + `mlp_scale` x a random tanh MLP
      of `mlp_depth` x `mlp_width`, a score whose cost is the MLP's, for timing).
    workdir, step, overrides: the trained run (problem 'checkpoint'), as `programs.load_run`.
    model: instead of a workdir, a registered pretrained model (`pretrained.MODELS`), loaded
      by name with its SHA-256 checked.
    samplers: names of `SAMPLER_GRID`.
    nfe: NFE budgets of the fixed-step samplers.
    grid: a name of `score_sde.sampling.GRIDS` given to every sampler that takes a `grid`
      (all the fixed-step ones: ddim, heun, dpm_solver, unipc, deis, ddpm, pc), so that all
      of them step on the same times; None (default): each method's own default grid.
    w: the stochasticities of the dial samplers `DIAL_SAMPLERS` (each finite, >= 0; 0 is the
      probability-flow ODE, 1 the reverse SDE).
    ode_tols: rtol = atol values of the adaptive 'ode' sampler.
    num_samples: samples per sampler (one shared x_T).
    eps: data-end time (None: `sampling.default_eps(sde)`).
    reference_solver, reference_tol, reference_dtype: the reference probability-flow ODE
      solve (a `score_sde.solvers` name, rtol = atol, 'float64' | 'float32').
    projections: directions of the sliced W1.
    repeats: timed runs per sampler, the one that gives the samples included (the best is
      kept).
    seed: seed of x_T, the samplers' noise, the truth draws and the projections.
    quality: trained runs: also FD / KID (feature network, data statistics).
    inception_weights: pt_inception-2015-12-05-*.pth (feature net 'inception').
  """
  problem: str = "mixture"
  mixture: str = "three_gaussians"
  image_shape: tuple[int, ...] = (8, 8, 1)
  sde: str = "vpsde"
  score: str = "exact"
  mlp_width: int = 512
  mlp_depth: int = 3
  mlp_scale: float = 0.01
  workdir: str | None = None
  model: str | None = None
  step: int | None = None
  overrides: tuple[str, ...] = ()
  samplers: tuple[str, ...] = tuple(SAMPLER_GRID)
  nfe: tuple[int, ...] = (10, 20, 50, 100, 200)
  grid: str | None = None
  w: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
  ode_tols: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5)
  num_samples: int = 2000
  eps: float | None = None
  reference_solver: str = "dopri8"
  reference_tol: float = 1e-8
  reference_dtype: str = "float64"
  projections: int = 256
  repeats: int = 3
  seed: int = 0
  quality: bool = True
  inception_weights: str | None = None

  def __post_init__(self):
    """Raises ValueError naming a bad value (and the valid ones)."""
    check_choice("problem", self.problem, PROBLEMS)
    if self.problem == "checkpoint" and not (self.workdir or self.model):
      raise ValueError("problem 'checkpoint' needs a workdir (a trained run) or a model "
                       f"(one of {sorted(pretrained.MODELS)})")
    if self.model is not None:
      if self.workdir:
        raise ValueError(f"give a workdir or a model, not both (got {self.workdir!r} and "
                         f"{self.model!r})")
      check_choice("pretrained model", self.model, pretrained.MODELS)
    check_choice("mixture", self.mixture, MIXTURES)
    check_choice("SDE", self.sde, sde_lib.SDES)
    check_choice("score", self.score, SCORES)
    check_choice("reference dtype", self.reference_dtype, REFERENCE_DTYPES)
    unknown = sorted(set(self.samplers) - set(SAMPLER_GRID))
    if unknown:
      raise ValueError(f"Unknown sampler(s) {unknown}; valid: {sorted(SAMPLER_GRID)}")
    if not self.samplers:
      raise ValueError(f"samplers is empty; valid: {sorted(SAMPLER_GRID)}")
    for name in ("num_samples", "projections", "repeats", "mlp_width", "mlp_depth"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.grid is not None:
      check_choice("grid", self.grid, sampling.GRIDS)
    if any(n < 1 for n in self.nfe):
      raise ValueError(f"NFE budgets must be >= 1, got {list(self.nfe)}")
    bad_w = [w for w in self.w if not (isinstance(w, (int, float)) and not isinstance(w, bool)
                                       and math.isfinite(w) and w >= 0)]
    if bad_w:
      raise ValueError(f"w must be finite numbers >= 0 (0: probability-flow ODE, 1: reverse "
                       f"SDE), got {list(self.w)}")
    if not self.w and set(self.samplers) & set(DIAL_SAMPLERS):
      raise ValueError(f"w is empty but the samplers include {sorted(DIAL_SAMPLERS)}: give at "
                       "least one w")
    if any(not tol > 0 for tol in (*self.ode_tols, self.reference_tol)):
      raise ValueError(f"tolerances must be > 0, got ode_tols {list(self.ode_tols)}, "
                       f"reference_tol {self.reference_tol}")
    if self.eps is not None and not self.eps > 0:
      raise ValueError(f"eps must be > 0, got {self.eps}")
    if any(s < 1 for s in self.image_shape):
      raise ValueError(f"image_shape entries must be >= 1, got {self.image_shape}")


@dataclasses.dataclass(frozen=True)
class Problem:
  """A score source: `score_fn(x [B, *D], t [B])` of `sde` over events `event_shape`, the
  data mixture where known (else None), a description and the run (trained runs, else None)."""
  score_fn: Callable
  sde: sde_lib.SDE
  event_shape: tuple[int, ...]
  mixture: mixtures.GaussianMixture | None
  description: str
  run: programs.Run | None = None


# --- score sources ---------------------------------------------------------------------------

def random_mlp_score(key: jax.Array, base_score, event_shape, width: int, depth: int,
                     scale: float):
  """`base_score + scale * MLP(x, t)` with a random tanh MLP: a score whose cost is dominated
  by `depth` dense layers of `width` units (for timing), close to `base_score` for small
  `scale`.

  Args:
    key: PRNG key of the MLP's weights.
    base_score: `score_fn(x [B, *D], t [B])`.
    event_shape: D.
    width, depth: hidden units and hidden layers.
    scale: factor of the MLP's output.

  Returns:
    `score_fn(x [B, *D], t [B]) -> [B, *D]`.
  """
  dim = int(np.prod(event_shape))
  sizes = [dim + 1] + [width] * depth + [dim]
  keys = jax.random.split(key, len(sizes) - 1)
  layers = [(jax.random.normal(k, (m, n)) / math.sqrt(m), jnp.zeros((n,)))
            for k, m, n in zip(keys, sizes[:-1], sizes[1:])]

  def score_fn(x, t):
    h = jnp.concatenate([x.reshape(x.shape[0], -1), t[:, None].astype(x.dtype)], axis=-1)
    for i, (w, b) in enumerate(layers):
      h = h @ w.astype(x.dtype) + b.astype(x.dtype)
      if i < len(layers) - 1:
        h = jnp.tanh(h)
    return base_score(x, t) + scale * h.reshape(x.shape)

  return score_fn


def build_problem(options: CompareOptions) -> Problem:
  """The score source of `options`.

  Raises:
    FileNotFoundError: problem 'checkpoint' and no run (config.json, checkpoint) in workdir.
  """
  if options.problem == "checkpoint" and options.model is not None:
    run = pretrained.load_pretrained(options.model)
    return Problem(run.score_fn(), run.spec.sde, tuple(run.spec.image_shape), None,
                   f"pretrained model {options.model} (step {run.step})", run)
  if options.problem == "checkpoint":
    run = programs.load_run(options.workdir, step=options.step, overrides=options.overrides)
    return Problem(run.score_fn(), run.spec.sde, tuple(run.spec.image_shape), None,
                   f"checkpoint {options.workdir} step {run.step}", run)
  mixture = MIXTURES[options.mixture](tuple(options.image_shape))
  sde = sde_lib.get_sde(options.sde)
  score_fn = mixture.score_fn(sde)
  what = f"{options.mixture} mixture {mixture.event_shape}, exact score"
  if options.score == "mlp":
    score_fn = random_mlp_score(jax.random.PRNGKey(options.seed + 1), score_fn,
                                mixture.event_shape, options.mlp_width, options.mlp_depth,
                                options.mlp_scale)
    what = (f"{options.mixture} mixture {mixture.event_shape}, exact score + "
            f"{options.mlp_scale} x random MLP ({options.mlp_depth} x {options.mlp_width})")
  return Problem(score_fn, sde, tuple(mixture.event_shape), mixture, what)


# --- metrics ---------------------------------------------------------------------------------

def rmse(x: np.ndarray, ref: np.ndarray) -> float:
  """sqrt(mean((x - ref)^2)) over all entries, in float64."""
  return float(np.sqrt(np.mean((np.asarray(x, np.float64) - np.asarray(ref, np.float64))**2)))


class QualityMeter:
  """FD and KID of a trained run's samples (model scale) against its data's cached statistics.

  Attributes:
    net: the feature network (`quality.get_feature_net`).
    floor: `(fd, kid)` of as many real test images: what a perfect sampler would score.
  """

  def __init__(self, run: programs.Run, num_samples: int, seed: int,
               inception_weights: str | None = None):
    config = run.config.copy_and_resolve_references()
    with config.unlocked():
      if inception_weights:
        config.eval.inception_weights = inception_weights
      config.data.uniform_dequantization = False
    self.config, self.seed = config, seed
    self.net = quality.get_feature_net(config)
    self.stats = quality.reference_stats(config, self.net)
    self.inverse_scaler = run.spec.inverse_scaler
    n = min(num_samples, experiment.make_dataset(config, "test", batch_size=1).num_examples)
    real = next(experiment.make_dataset(config, "test", batch_size=n).iterate_once())["image"]
    self.floor = self._measure(np.asarray(real))

  def _measure(self, images01: np.ndarray) -> tuple[float, float]:
    feats, _ = self.net(np.clip(images01, 0.0, 1.0))
    fd = metrics.frechet_distance(*metrics.feature_statistics(feats), self.stats["mu"],
                                  self.stats["sigma"])
    kid, _ = metrics.kernel_inception_distance(
        feats, self.stats["features"], num_subsets=int(self.config.eval.kid_subsets),
        subset_size=int(self.config.eval.kid_subset_size), seed=self.seed)
    return fd, kid

  def __call__(self, x) -> tuple[float, float]:
    """`(fd, kid)` of samples `x` at model scale."""
    return self._measure(np.asarray(self.inverse_scaler(x)))


# --- the comparison --------------------------------------------------------------------------

def _options_text(options: dict) -> str:
  return ", ".join(f"{k}={v}" for k, v in options.items())


def _fmt(v, digits=4) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  return f"{v:.{digits}g}"


def sampler_jobs(options: CompareOptions) -> list[tuple[str, SamplerSpec, dict]]:
  """`(name, spec, sampler options)` of every run of the grid, in order: per sampler, its NFE
  budgets (or ODE tolerances); budgets a sampler cannot meet (steps < 1, Heun < 2) left out.
  With `options.grid`, every method that takes a `grid` gets it. The dial samplers run per
  w of `options.w`, named `sde_w{w:g}` / `sde_heun_w{w:g}`."""
  jobs = []
  for name in options.samplers:
    spec = SAMPLER_GRID[name]
    if options.grid is not None and "grid" in sampling.sampler_options(spec.method):
      spec = dataclasses.replace(spec, options=spec.options + (("grid", options.grid),))
    if name in DIAL_SAMPLERS:
      for w in options.w:
        dial = dataclasses.replace(spec, deterministic=float(w) == 0.0)
        for n in options.nfe:
          steps = spec.steps_for_nfe(n)
          if steps >= 1:
            jobs.append((f"{name}_w{float(w):g}", dial, dict(spec.options, w=float(w),
                                                             steps=steps)))
    elif spec.steps_for_nfe is None:
      for tol in options.ode_tols:
        jobs.append((name, spec, dict(spec.options, rtol=tol, atol=tol)))
    else:
      for n in options.nfe:
        steps = spec.steps_for_nfe(n)
        if steps >= 1 and not (spec.method == "heun" and steps < 2):
          jobs.append((name, spec, dict(spec.options, steps=steps)))
  return jobs


def run_comparison(options: CompareOptions, *, progress: bool = True
                   ) -> tuple[list[dict], dict]:
  """Runs the grid.

  Returns:
    `(rows, summary)`: one dict per run keyed by `COLUMNS` (the reference first; None where
    a number does not apply), and the summary (problem, SDE, eps, reference, floors, bare
    score times in ms).

  Raises:
    FileNotFoundError: problem 'checkpoint' and no run in the workdir.
  """
  problem = build_problem(options)
  score_fn, sde, mixture = problem.score_fn, problem.sde, problem.mixture
  eps = sampling.default_eps(sde) if options.eps is None else options.eps
  n = options.num_samples
  shape = (n,) + tuple(problem.event_shape)
  key = jax.random.PRNGKey(options.seed)
  k_prior, k_sample, k_truth, k_floor, k_proj = jax.random.split(key, 5)
  x_T = jax.jit(lambda k: sde.prior_sampling(k, shape).astype(jnp.float32))(k_prior)

  # The reference: a tight probability-flow ODE solve from the same x_T.
  x64 = options.reference_dtype == "float64"
  with jax.enable_x64(x64):
    ref_fn = jax.jit(lambda k, x: sampling.sample(
        k, score_fn, sde, shape, "ode", x_T=x, eps=eps, solver=options.reference_solver,
        rtol=options.reference_tol, atol=options.reference_tol, max_steps=65536))
    x_ref, ref_nfe = ref_fn(k_sample, x_T.astype(jnp.float64 if x64 else jnp.float32))
    x_ref = np.asarray(x_ref, np.float64)
  summary = dict(problem=problem.description, sde=type(sde).__name__, eps=eps, num_samples=n,
                 grid=options.grid or OWN_GRIDS,
                 reference=f"ode {options.reference_solver} "
                           f"rtol=atol={options.reference_tol:g} "
                           f"({options.reference_dtype}), NFE {int(ref_nfe)}")

  truth = None
  if mixture is not None:
    draw = jax.jit(lambda k: mixture.sample(k, n)[0])
    truth = np.asarray(draw(k_truth), np.float64)
    floor = np.asarray(draw(k_floor), np.float64)
    summary["sliced_w1_floor"] = metrics.sliced_wasserstein1(k_proj, floor, truth,
                                                             options.projections)
    summary["mode_tv_floor"] = mixtures.mode_weight_tv(mixture, floor)

  def distances(x):
    if truth is None:
      return None, None
    return (metrics.sliced_wasserstein1(k_proj, x, truth, options.projections),
            mixtures.mode_weight_tv(mixture, x))

  meter = None
  if problem.run is not None and options.quality:
    meter = QualityMeter(problem.run, n, options.seed, options.inception_weights)
    summary["feature_net"] = meter.net.name
    summary["fd_floor"], summary["kid_floor"] = meter.floor

  def quality_of(x):
    return meter(x) if meter is not None else (None, None)

  # One bare score evaluation on the same batch, jitted, best of many calls.
  t_mid = jnp.full((n,), 0.5 * (sde.T + eps), jnp.float32)
  bare = jax.jit(score_fn).lower(x_T, t_mid).compile()
  bare_s = timing.best_seconds(lambda: bare(x_T, t_mid), max(20, 5 * options.repeats))
  summary["bare_score_ms"] = 1e3 * bare_s

  # The same, per call, over a run of 50 back-to-back calls (dispatch overlapped, one sync):
  # a run as long as a sampler's, so it sees the same machine noise on a shared box.
  def bare_run():
    out = None
    for _ in range(50):
      out = bare(x_T, t_mid)
    return out

  summary["bare_score_ms_in_run"] = 1e3 * timing.best_seconds(bare_run, options.repeats) / 50

  ref_sw, ref_tv = distances(x_ref)
  ref_fd, ref_kid = quality_of(x_ref)
  rows = [dict(sampler="reference", method="ode",
               options=f"solver={options.reference_solver}, "
                       f"rtol=atol={options.reference_tol:g}",
               nfe=int(ref_nfe), ms_per_sample=None, ms_per_nfe=None, ratio_to_bare_score=None,
               rmse_vs_reference=0.0, sliced_w1=ref_sw, mode_tv=ref_tv, fd=ref_fd,
               kid=ref_kid)]

  jobs = sampler_jobs(options)
  for name, spec, sampler_options in tqdm(jobs, desc="samplers", unit="run", file=sys.stdout,
                                          disable=not progress):
    fn = jax.jit(lambda k, x, spec=spec, o=sampler_options: sampling.sample(
        k, score_fn, sde, shape, spec.method, x_T=x, eps=eps, **o))
    compiled = fn.lower(k_sample, x_T).compile()
    # The call that gives the samples is the first timed run: with repeats=1 (long grids
    # on slow machines) each sampler runs once.
    start = time.perf_counter()
    x, nfe = jax.block_until_ready(compiled(k_sample, x_T))
    seconds = time.perf_counter() - start
    if options.repeats > 1:
      seconds = min(seconds, timing.best_seconds(lambda: compiled(k_sample, x_T),
                                                 options.repeats - 1))
    nfe = int(nfe)
    x = np.asarray(x, np.float64)
    sw, tv = distances(x)
    fd, kid = quality_of(x)
    rows.append(dict(
        sampler=name, method=spec.method, options=_options_text(sampler_options), nfe=nfe,
        ms_per_sample=1e3 * seconds / n, ms_per_nfe=1e3 * seconds / nfe,
        ratio_to_bare_score=seconds / nfe / bare_s,
        rmse_vs_reference=rmse(x, x_ref) if spec.deterministic else None,
        sliced_w1=sw, mode_tv=tv, fd=fd, kid=kid))
  return rows, summary


# --- outputs ---------------------------------------------------------------------------------

def write_csv(rows: list[dict], path) -> None:
  """The rows as CSV with header `COLUMNS` ('n/a' for None), to a path or a text stream."""
  def write(f):
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("n/a" if row[k] is None else row[k]) for k in COLUMNS})

  if hasattr(path, "write"):
    write(path)
  else:
    with open(path, "w", newline="") as f:
      write(f)


def markdown_table(rows: list[dict], summary: dict) -> str:
  """The summary as a few lines, then the rows as a Markdown table of `COLUMNS`."""
  lines = [f"Problem: {summary['problem']}; SDE {summary['sde']}, eps = {summary['eps']:g}; "
           f"{summary['num_samples']} samples from one shared x_T; time grid: "
           f"{summary.get('grid', OWN_GRIDS)}.",
           f"Reference: {summary['reference']}.",
           f"Bare jitted score_fn call on the batch: {summary['bare_score_ms']:.4g} ms "
           f"(best single call; {summary['bare_score_ms_in_run']:.4g} ms per call in a run "
           f"of 50) "
           f"({platform.machine()}, JAX {jax.__version__} on {jax.default_backend()}).",
           ]
  if "sliced_w1_floor" in summary:
    lines.append(f"Finite-sample floors (fresh truth vs truth): sliced W1 "
                 f"{summary['sliced_w1_floor']:.3g}, mode TV {summary['mode_tv_floor']:.3g}.")
  if summary.get("feature_net"):
    lines.append(f"fd / kid: on {summary['feature_net']} features against the data's cached "
                 f"statistics; floor ({summary['num_samples']} real test images): FD "
                 f"{_fmt(summary['fd_floor'])}, KID {_fmt(summary['kid_floor'])}.")
  lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for row in rows:
    lines.append("| " + " | ".join(row[k] if isinstance(row[k], str) else _fmt(row[k])
                                   for k in COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], summary: dict, path: str) -> None:
  """Error vs NFE (deterministic samplers), sliced W1 vs NFE (mixtures) and FD vs NFE
  (trained runs), log-log, as one PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  has_dist = any(r["sliced_w1"] is not None for r in rows)
  has_fd = any(r.get("fd") is not None for r in rows)
  panels = 1 + has_dist + has_fd
  fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
  names = [n for n in dict.fromkeys(r["sampler"] for r in rows) if n != "reference"]
  ref = next(r for r in rows if r["sampler"] == "reference")
  for name in names:
    rs = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
    nfe = [r["nfe"] for r in rs]
    if rs[0]["rmse_vs_reference"] is not None:
      axes[0, 0].loglog(nfe, [max(r["rmse_vs_reference"], 1e-12) for r in rs], "o-",
                        label=name)
    if has_dist:
      axes[0, 1].loglog(nfe, [r["sliced_w1"] for r in rs], "o-", label=name)
  axes[0, 0].set(xlabel="NFE (score evaluations)", ylabel="RMSE vs reference ODE solve",
                 title="Pathwise error (deterministic samplers)")
  axes[0, 0].legend(fontsize=8)
  if has_dist:
    ax = axes[0, 1]
    ax.axhline(ref["sliced_w1"], color="k", ls="--", lw=1, label="reference ODE")
    ax.axhline(summary["sliced_w1_floor"], color="gray", ls=":", lw=1,
               label="finite-sample floor")
    ax.set(xlabel="NFE (score evaluations)", ylabel="sliced W1 to fresh data samples",
           title="Distribution distance")
    ax.legend(fontsize=8)
  if has_fd:
    ax = axes[0, -1]
    for name in names:
      rs = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
      ax.loglog([r["nfe"] for r in rs], [max(r["fd"], 1e-6) for r in rs], "o-", label=name)
    ax.axhline(ref["fd"], color="k", ls="--", lw=1, label="reference ODE")
    if summary.get("fd_floor") is not None:
      ax.axhline(summary["fd_floor"], color="gray", ls=":", lw=1, label="data floor")
    ax.set(xlabel="NFE (score evaluations)",
           ylabel=f"FD ({summary.get('feature_net')} features)",
           title="Sample quality vs NFE")
    ax.legend(fontsize=8)
  for ax in axes.ravel():
    ax.grid(True, which="both", alpha=0.3)
  fig.suptitle(f"{summary['problem']}, {summary['sde']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")
  plt.close(fig)


def timing_line(rows: list[dict], summary: dict) -> str:
  """'time per NFE vs one bare score evaluation', for each sampler at its largest NFE."""
  parts = []
  for name in dict.fromkeys(r["sampler"] for r in rows):
    if name == "reference":
      continue
    r = max((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
    parts.append(f"{name} (NFE {r['nfe']}): {r['ms_per_nfe']:.4g} ms/NFE = "
                 f"{r['ratio_to_bare_score']:.2f}x")
  return (f"time per NFE vs one bare score evaluation: bare jitted score_fn "
          f"{summary['bare_score_ms']:.4g} ms on [{summary['num_samples']}, ...] "
          f"({summary['bare_score_ms_in_run']:.4g} ms per call in a run of 50); "
          + "; ".join(parts))


def results_paths(out_dir: str, *, overwrite: bool = False) -> dict[str, str]:
  """`{"csv", "md", "png"}` -> the paths `write_results` writes in `out_dir`.

  Raises:
    FileExistsError: one exists and `overwrite` is False (check before any work).
  """
  paths = {ext: os.path.join(out_dir, f"results.{ext}") for ext in ("csv", "md", "png")}
  for path in paths.values():
    files.check_new(path, overwrite=overwrite, flag="--overwrite")
  return paths


def write_results(rows: list[dict], summary: dict, out_dir: str, *, overwrite: bool = False
                  ) -> dict[str, str]:
  """Writes `results.csv`, `results.md` and `results.png` into `out_dir` (made if missing),
  each atomically; existing ones are replaced only with `overwrite` (else FileExistsError,
  before anything is written).

  Returns:
    `{"csv": path, "md": path, "png": path}`.
  """
  paths = results_paths(out_dir, overwrite=overwrite)
  os.makedirs(out_dir, exist_ok=True)
  table = io.StringIO()
  write_csv(rows, table)
  files.write_text(paths["csv"], table.getvalue(), overwrite=overwrite, flag="--overwrite")
  files.write_text(paths["md"], markdown_table(rows, summary), overwrite=overwrite,
                   flag="--overwrite")
  files.write_atomic(paths["png"], lambda f: plot(rows, summary, f), overwrite=overwrite,
                     flag="--overwrite")
  return paths
