"""Compare samplers by accuracy, distribution distance and speed at equal numbers of score
evaluations (NFE), all from the same starting noise x_T.

    python scripts/compare_samplers.py                                  # 2-D mixture, VP SDE
    python scripts/compare_samplers.py --sde=vesde --mixture=image --image_shape=8,8,1
    python scripts/compare_samplers.py --score=mlp --mlp_width=1024 --num_samples=512 \
        --samplers=ddim,dpm_solver2 --nfe=50                           # per-NFE overhead
    python scripts/compare_samplers.py --config=configs/cifar10_vp.py \
        --workdir=runs/cifar10_vp --num_samples=64                     # a trained checkpoint

For each sampler of `SAMPLER_GRID` and each NFE budget it runs
`score_sde.sampling.sample(key, score_fn, sde, shape, method, x_T=x_T, ...)` compiled once
(`jax.jit`), then timed (best of `--repeats`, after `block_until_ready`), and measures:

* `rmse_vs_reference`: the pathwise error sqrt(mean((x - x_ref)^2)) over all samples and
  dimensions, against a tight probability-flow ODE solve from the same x_T (`ode`, default
  dopri8 with rtol = atol = 1e-8 in float64). Only meaningful for deterministic samplers (DDIM
  with eta = 0, Heun without churn, DPM-Solver, ODE); `n/a` for stochastic ones (DDPM, PC),
  whose outputs depend on their own noise.
* `sliced_w1` (where the data distribution is known, i.e. the mixture problem): the sliced
  Wasserstein-1 distance between the samples and as many fresh draws from the mixture, the
  mean over `--projections` random unit directions of the 1-D W1 between sorted projections.
  Its finite-sample floor (two independent draws from the truth) is printed with the table.
* `mode_tv`: total variation between the fraction of samples assigned to each mixture
  component (by the largest posterior responsibility) and the mixture weights: it catches
  samplers that get the mode weights wrong while each mode looks right.
* `ms_per_sample`, `ms_per_nfe` and `ratio_to_bare_score`: compiled wall time per sample,
  per score evaluation, and the latter divided by the time of one jitted bare `score_fn` call
  on the same batch (best single call; 1.0 = no per-step overhead; below 1 the bare call's
  own dispatch cost dominates, which happens for cheap scores: use `--score=mlp` to make the
  score dominate). The table header also gives the bare time per call over a run of 50 calls,
  which on a busy machine sees the same noise as a sampler run.

* `fd` and `kid` (trained checkpoints, `--problem=checkpoint`): the Frechet distance and KID
  (`score_sde.metrics`) of the samples, inverse-scaled to [0, 1], against cached statistics
  of the run's dataset (`config.eval.fid_split`, default train) on the config's feature
  network (`config.eval.fid_feature_net`: the shipped Fashion-MNIST classifier for
  Fashion-MNIST, Inception-v3 with `--inception_weights` otherwise). The table header gives
  their floor: as many real test images against the same statistics. `--no_quality` skips
  them. FD on 10 classifier features is noisy below a few thousand samples.

All samplers return denoised samples (`denoise=True`, their default: the last step is the
Tweedie estimate at eps), and so does the reference. Writes `results.csv`, `results.md` and
`results.png` (error and distance vs NFE, log-log) under `--out`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import math
import os
import platform
import sys
from typing import Callable

import common  # scripts/common.py; puts the repository root on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from score_sde import mixtures, sampling
from score_sde import sde as sde_lib

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
    "ddpm": SamplerSpec("ddpm", (), lambda n: n, False),
    "pc_em": SamplerSpec("pc", (("predictor", "euler_maruyama"), ("corrector", "none")),
                         lambda n: n, False),
    "pc_rd_langevin": SamplerSpec(
        "pc", (("predictor", "reverse_diffusion"), ("corrector", "langevin"), ("snr", 0.16),
               ("n_steps", 1)), lambda n: n // 2, False),
    "ode": SamplerSpec("ode", (("solver", "tsit5"),), None, True),
}


# --- score sources ---------------------------------------------------------------------------

def random_mlp_score(key: jax.Array, base_score, event_shape, width: int, depth: int,
                     scale: float):
  """`base_score + scale * MLP(x, t)` with a random tanh MLP: a score whose cost is dominated
  by `depth` dense layers of `width` units (for timing), close to `base_score` for small
  `scale`."""
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


def load_score_fn_from_checkpoint(config, workdir: str, step: int | None = None):
  """The EMA score function of a training run's checkpoint.

  Args:
    config: the run's ml_collections config.
    workdir: the run directory (checkpoints under `<workdir>/checkpoints/<step>/`).
    step: which checkpoint (default: the latest).

  Returns:
    `(score_fn, sde, event_shape)`: `score_fn(x [B, H, W, C], t [B])`, the run's SDE and
    `(H, W, C)`.

  Raises:
    FileNotFoundError: no checkpoint in `workdir` (or not `step`).
  """
  from score_sde.run import evaluate
  from score_sde import models

  state, _, model, sde = evaluate.load_checkpoint(config, workdir, step)
  score_fn = models.get_score_fn(sde, model, state.variables(ema=True), train=False,
                                 continuous=bool(config.training.continuous))
  return score_fn, sde, tuple(models.image_shape(config))


# --- metrics ---------------------------------------------------------------------------------

def sliced_wasserstein1(key: jax.Array, a: np.ndarray, b: np.ndarray, projections: int = 256
                        ) -> float:
  """Sliced W1 between two equal-size samples `[N, *D]`: the mean over random unit directions
  of the 1-D Wasserstein-1 distance (mean absolute difference of sorted projections)."""
  a = np.asarray(a, np.float64).reshape(a.shape[0], -1)
  b = np.asarray(b, np.float64).reshape(b.shape[0], -1)
  if a.shape != b.shape:
    raise ValueError(f"need equal-size samples, got {a.shape} and {b.shape}")
  dirs = np.asarray(jax.random.normal(key, (a.shape[1], projections)), np.float64)
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  return float(np.mean(np.abs(np.sort(a @ dirs, axis=0) - np.sort(b @ dirs, axis=0))))


def mode_weight_tv(mixture: mixtures.GaussianMixture, x: np.ndarray) -> float:
  """Total variation between the samples' component frequencies (argmax responsibility under
  the data density) and the mixture weights."""
  resp = _jitted_responsibilities(mixture)(jnp.asarray(x, jnp.float32))
  comp = np.argmax(np.asarray(resp), axis=-1)
  freq = np.bincount(comp, minlength=len(mixture.weights)) / len(comp)
  return float(0.5 * np.sum(np.abs(freq - np.asarray(mixture.weights))))


@functools.lru_cache(maxsize=None)
def _jitted_responsibilities(mixture: mixtures.GaussianMixture):
  return jax.jit(mixture.responsibilities)


def rmse(x: np.ndarray, ref: np.ndarray) -> float:
  return float(np.sqrt(np.mean((np.asarray(x, np.float64) - np.asarray(ref, np.float64))**2)))


def _time_compiled(fn, args, repeats: int) -> float:
  """Best wall time in seconds of `fn(*args)` (already compiled) over `repeats` runs."""
  return min(common.call_times(lambda: fn(*args), repeats))


# --- the comparison --------------------------------------------------------------------------

def _options_text(options: dict) -> str:
  return ", ".join(f"{k}={v}" for k, v in options.items())


def _fmt(v, digits=4) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  return f"{v:.{digits}g}"


def build_problem(args):
  """(score_fn, sde, event_shape, mixture or None, description) from the flags."""
  if args.problem == "checkpoint":
    if not args.workdir or not args.config:
      raise ValueError("--problem=checkpoint needs --workdir and --config")
    score_fn, sde, event_shape = load_score_fn_from_checkpoint(
        common.load_config(args.config), args.workdir)
    return score_fn, sde, event_shape, None, f"checkpoint {args.workdir}"
  if args.problem != "mixture":
    raise ValueError(f"Unknown --problem {args.problem!r}; valid: ['checkpoint', 'mixture']")
  if args.mixture == "three_gaussians":
    mixture = mixtures.three_gaussians_mixture()
  elif args.mixture == "image":
    shape = tuple(int(s) for s in args.image_shape.split(","))
    mixture = mixtures.image_mixture(event_shape=shape)
  else:
    raise ValueError(f"Unknown --mixture {args.mixture!r}; valid: ['image', 'three_gaussians']")
  sde = sde_lib.get_sde(args.sde)
  score_fn = mixture.score_fn(sde)
  what = f"{args.mixture} mixture {mixture.event_shape}, exact score"
  if args.score == "mlp":
    score_fn = random_mlp_score(jax.random.PRNGKey(args.seed + 1), score_fn,
                                mixture.event_shape, args.mlp_width, args.mlp_depth,
                                args.mlp_scale)
    what = (f"{args.mixture} mixture {mixture.event_shape}, exact score + {args.mlp_scale} x "
            f"random MLP ({args.mlp_depth} x {args.mlp_width})")
  elif args.score != "exact":
    raise ValueError(f"Unknown --score {args.score!r}; valid: ['exact', 'mlp']")
  return score_fn, sde, mixture.event_shape, mixture, what


class _QualityMeter:
  """FD and KID of samples of a checkpoint's config against its cached data statistics."""

  def __init__(self, config, num_samples: int, seed: int):
    from score_sde.io import datasets
    from score_sde.run import quality

    self.config, self.seed = config, seed
    self.net = quality.get_feature_net(config)
    self.stats = quality.reference_stats(config, self.net)
    self.inverse_scaler = datasets.get_data_inverse_scaler(config.data.centered)
    test_config = type(config)(config.to_dict())
    test_config.data.uniform_dequantization = False
    n = min(num_samples, datasets.get_dataset(test_config, "test", batch_size=1).num_examples)
    real = next(datasets.get_dataset(test_config, "test", batch_size=n).iterate_once())["image"]
    self.floor = self._measure(real, scaled=False)

  def _measure(self, x, scaled: bool = True) -> tuple[float, float]:
    from score_sde import metrics

    images = np.clip(np.asarray(self.inverse_scaler(x)) if scaled else x, 0.0, 1.0)
    feats, _ = self.net(images)
    fd = metrics.frechet_distance(*metrics.feature_statistics(feats), self.stats["mu"],
                                  self.stats["sigma"])
    kid, _ = metrics.kernel_inception_distance(
        feats, self.stats["features"], num_subsets=int(self.config.eval.kid_subsets),
        subset_size=int(self.config.eval.kid_subset_size), seed=self.seed)
    return fd, kid

  def __call__(self, x) -> tuple[float, float]:
    return self._measure(x)


def run_comparison(args) -> tuple[list[dict], dict]:
  """Runs the grid. Returns (rows keyed by COLUMNS, summary dict)."""
  from tqdm import tqdm

  unknown = sorted(set(args.samplers) - set(SAMPLER_GRID))
  if unknown:
    raise ValueError(f"Unknown sampler(s) {unknown}; valid: {sorted(SAMPLER_GRID)}")
  score_fn, sde, event_shape, mixture, what = build_problem(args)
  eps = sampling.default_eps(sde) if args.eps is None else args.eps
  shape = (args.num_samples,) + tuple(event_shape)
  key = jax.random.PRNGKey(args.seed)
  k_prior, k_sample, k_truth, k_floor, k_proj = jax.random.split(key, 5)
  x_T = jax.jit(lambda k: sde.prior_sampling(k, shape).astype(jnp.float32))(k_prior)

  # The reference: a tight probability-flow ODE solve from the same x_T.
  ref_dtype = jnp.float64 if args.reference_dtype == "float64" else jnp.float32
  with jax.enable_x64(args.reference_dtype == "float64"):
    ref_fn = jax.jit(lambda k, x: sampling.sample(
        k, score_fn, sde, shape, "ode", x_T=x, eps=eps, solver=args.reference_solver,
        rtol=args.reference_tol, atol=args.reference_tol, max_steps=65536))
    x_ref, ref_nfe = ref_fn(k_sample, x_T.astype(ref_dtype))
    x_ref = np.asarray(x_ref, np.float64)
  summary = dict(problem=what, sde=type(sde).__name__, eps=eps, num_samples=args.num_samples,
                 reference=f"ode {args.reference_solver} rtol=atol={args.reference_tol:g} "
                           f"({args.reference_dtype}), NFE {int(ref_nfe)}")

  truth = None
  if mixture is not None:
    draw = jax.jit(lambda k: mixture.sample(k, args.num_samples)[0])
    truth = np.asarray(draw(k_truth), np.float64)
    floor = np.asarray(draw(k_floor), np.float64)
    summary["sliced_w1_floor"] = sliced_wasserstein1(k_proj, floor, truth, args.projections)
    summary["mode_tv_floor"] = mode_weight_tv(mixture, floor)

  def distances(x):
    if truth is None:
      return None, None
    return (sliced_wasserstein1(k_proj, x, truth, args.projections), mode_weight_tv(mixture, x))

  meter = None
  if args.problem == "checkpoint" and args.quality:
    config = common.load_config(args.config)
    if args.inception_weights:
      config.eval.inception_weights = args.inception_weights
    meter = _QualityMeter(config, args.num_samples, args.seed)
    summary["feature_net"] = meter.net.name
    summary["fd_floor"], summary["kid_floor"] = meter.floor

  def quality_of(x):
    return meter(x) if meter is not None else (None, None)

  # One bare score evaluation on the same batch, jitted, best of many calls.
  t_mid = jnp.full((args.num_samples,), 0.5 * (sde.T + eps), jnp.float32)
  bare = jax.jit(score_fn).lower(x_T, t_mid).compile()
  bare_s = _time_compiled(bare, (x_T, t_mid), max(20, 5 * args.repeats))
  summary["bare_score_ms"] = 1e3 * bare_s
  # The same, per call, over a run of 50 back-to-back calls (dispatch overlapped, one sync):
  # a run as long as a sampler's, so it sees the same machine noise on a shared box.
  def bare_run(x, t):
    out = None
    for _ in range(50):
      out = bare(x, t)
    return out
  summary["bare_score_ms_in_run"] = 1e3 * _time_compiled(bare_run, (x_T, t_mid),
                                                         args.repeats) / 50

  ref_sw, ref_tv = distances(x_ref)
  ref_fd, ref_kid = quality_of(x_ref)
  rows = [dict(sampler="reference", method="ode",
               options=f"solver={args.reference_solver}, rtol=atol={args.reference_tol:g}",
               nfe=int(ref_nfe), ms_per_sample=None, ms_per_nfe=None, ratio_to_bare_score=None,
               rmse_vs_reference=0.0, sliced_w1=ref_sw, mode_tv=ref_tv, fd=ref_fd,
               kid=ref_kid)]

  jobs = []
  for name in args.samplers:
    spec = SAMPLER_GRID[name]
    if spec.steps_for_nfe is None:
      for tol in args.ode_tols:
        jobs.append((name, spec, dict(spec.options, rtol=tol, atol=tol)))
    else:
      for n in args.nfe:
        steps = spec.steps_for_nfe(n)
        if steps >= 1 and not (spec.method == "heun" and steps < 2):
          jobs.append((name, spec, dict(spec.options, steps=steps)))

  for name, spec, options in tqdm(jobs, desc="samplers", unit="run", file=sys.stdout):
    fn = jax.jit(lambda k, x, spec=spec, options=options: sampling.sample(
        k, score_fn, sde, shape, spec.method, x_T=x, eps=eps, **options))
    compiled = fn.lower(k_sample, x_T).compile()
    x, nfe = compiled(k_sample, x_T)
    nfe = int(nfe)
    seconds = _time_compiled(compiled, (k_sample, x_T), args.repeats)
    x = np.asarray(x, np.float64)
    sw, tv = distances(x)
    fd, kid = quality_of(x)
    rows.append(dict(
        sampler=name, method=spec.method, options=_options_text(options), nfe=nfe,
        ms_per_sample=1e3 * seconds / args.num_samples, ms_per_nfe=1e3 * seconds / nfe,
        ratio_to_bare_score=seconds / nfe / bare_s,
        rmse_vs_reference=rmse(x, x_ref) if spec.deterministic else None,
        sliced_w1=sw, mode_tv=tv, fd=fd, kid=kid))
  return rows, summary


# --- outputs ---------------------------------------------------------------------------------

def write_csv(rows, path):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("n/a" if row[k] is None else row[k]) for k in COLUMNS})


def markdown_table(rows, summary) -> str:
  lines = [f"Problem: {summary['problem']}; SDE {summary['sde']}, eps = {summary['eps']:g}; "
           f"{summary['num_samples']} samples from one shared x_T.",
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


def plot(rows, summary, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  has_dist = any(r["sliced_w1"] is not None for r in rows)
  has_fd = any(r.get("fd") is not None for r in rows)
  panels = 1 + has_dist + has_fd
  fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
  names = [n for n in dict.fromkeys(r["sampler"] for r in rows) if n != "reference"]
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
    ref = next(r for r in rows if r["sampler"] == "reference")
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
    ref = next(r for r in rows if r["sampler"] == "reference")
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
  fig.savefig(path, dpi=120)
  plt.close(fig)


def timing_line(rows, summary) -> str:
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


# --- CLI -------------------------------------------------------------------------------------

def _floats(text):
  return [float(v) for v in text.split(",") if v]


def _ints(text):
  return [int(v) for v in text.split(",") if v]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--problem", choices=["mixture", "checkpoint"], default=None,
                 help="score source (default: checkpoint if --workdir is given, else mixture)")
  p.add_argument("--mixture", default="three_gaussians", help="three_gaussians (2-D) or image")
  p.add_argument("--image_shape", default="8,8,1", help="event shape of --mixture=image")
  p.add_argument("--sde", default="vpsde", help=f"one of {sorted(sde_lib.SDES)}")
  p.add_argument("--score", default="exact",
                 help="exact (mixture score) or mlp (exact + a random MLP, for timing)")
  p.add_argument("--mlp_width", type=int, default=512)
  p.add_argument("--mlp_depth", type=int, default=3)
  p.add_argument("--mlp_scale", type=float, default=0.01)
  p.add_argument("--config", default=None, help="config file of a training run")
  p.add_argument("--workdir", default=None, help="training run directory (checkpoints)")
  p.add_argument("--samplers", type=lambda s: [v for v in s.split(",") if v],
                 default=list(SAMPLER_GRID), help=f"subset of {list(SAMPLER_GRID)}")
  p.add_argument("--nfe", type=_ints, default=[10, 20, 50, 100, 200],
                 help="NFE budgets of the fixed-step samplers")
  p.add_argument("--ode_tols", type=_floats, default=[1e-2, 1e-3, 1e-4, 1e-5],
                 help="rtol = atol values of the adaptive 'ode' sampler")
  p.add_argument("--num_samples", type=int, default=2000)
  p.add_argument("--eps", type=float, default=None,
                 help="data-end time (default sampling.default_eps(sde))")
  p.add_argument("--reference_solver", default="dopri8")
  p.add_argument("--reference_tol", type=float, default=1e-8)
  p.add_argument("--reference_dtype", choices=["float64", "float32"], default="float64")
  p.add_argument("--projections", type=int, default=256, help="directions of sliced W1")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per sampler (best kept)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no_quality", dest="quality", action="store_false",
                 help="checkpoints: skip FD / KID (feature network, data statistics)")
  p.add_argument("--inception_weights", default=None,
                 help="pt_inception-2015-12-05-*.pth (feature net 'inception')")
  p.add_argument("--out", default="runs/compare_samplers")
  args = p.parse_args(argv)
  if args.problem is None:
    args.problem = "checkpoint" if args.workdir else "mixture"
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  rows, summary = run_comparison(args)
  os.makedirs(args.out, exist_ok=True)
  write_csv(rows, os.path.join(args.out, "results.csv"))
  table = markdown_table(rows, summary)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table)
  plot(rows, summary, os.path.join(args.out, "results.png"))
  print(table)
  print(timing_line(rows, summary))
  print(f"wrote {args.out}/results.csv, results.md, results.png")
  return rows


if __name__ == "__main__":
  from score_sde.io import logs
  logs.setup_logging()  # no orbax / JAX chatter between the progress bars
  main()
