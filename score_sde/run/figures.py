"""Pictures and per-sampler numbers of a trained run (`scripts/sampler_panel.py`,
`scripts/lecture_figures.py`).

    run = programs.load_run("runs/fashion_mnist_vp")
    samples, stats, data_stats = sampler_panel(run, ["pc", "ode", "ddim"], num_samples=36)
    paths = lecture_figures(run, "docs")

Every sampler starts from the same noise x_T (one key), so the rows and panels differ only
by the sampler.
"""

from __future__ import annotations

import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from score_sde import likelihood, sampling, trajectories
from score_sde.checks import check_choice
from score_sde.io import images, parallel
from score_sde.run import experiment, programs, quality

# The demo's sampler settings: NFE in brackets (with denoising).
DEMO_SAMPLERS: dict[str, dict] = {
    "pc": dict(predictor="reverse_diffusion", corrector="langevin", steps=150),  # [300]
    "ode": dict(solver="tsit5", rtol=1e-3, atol=1e-3),  # [adaptive]
    "ddim": dict(steps=50),  # [51]
    "dpm_solver": dict(steps=25, order=2),  # [26]
    "heun": dict(steps=18),  # [35]
    "ddpm": dict(steps=200),  # [200]
    "unipc": dict(steps=25, order=2),  # [26]  (bh2 with UniC; --methods=...,unipc,deis)
    "deis": dict(steps=25, order=2),  # [26]
}
SATURATION = (-0.05, 1.05)  # pixels outside this range of [0, 1] count as saturated

# Random streams of the figures: fold_in(PRNGKey(seed), stream) (the lecture figures' and the
# panel's are separate programs; the numbers are those the scripts always used).
_STREAM_PANEL_NOISE, _STREAM_PANEL_SAMPLERS = 0, 1
_STREAM_PROGRESSIVE, _STREAM_ENCODE, _STREAM_DECODE = 0, 1, 2
_STREAM_ROWS_NOISE, _STREAM_ROWS_SAMPLERS = 3, 4


def check_samplers(methods: Sequence[str]) -> None:
  """Raises ValueError naming methods that `DEMO_SAMPLERS` has no settings for."""
  unknown = [m for m in methods if m not in DEMO_SAMPLERS]
  if unknown or not methods:
    raise ValueError(f"Unknown sampler(s) {unknown or list(methods)}; valid: "
                     f"{list(DEMO_SAMPLERS)}")


def pixel_stats(x01: np.ndarray) -> dict:
  """Saturated fraction (outside `SATURATION`), mean and std of images in [0, 1] units
  (not clipped): `{"saturated", "mean", "std"}` as floats."""
  x = np.asarray(x01, np.float64)
  lo, hi = SATURATION
  return dict(saturated=float(np.mean((x < lo) | (x > hi))), mean=float(x.mean()),
              std=float(x.std()))


def _test_images(run: programs.Run, n: int) -> np.ndarray:
  """The first `n` test images `[n, H, W, C]` in [0, 1] (fewer if the split is smaller)."""
  config = run.config.copy_and_resolve_references()
  with config.unlocked():
    config.data.uniform_dequantization = False
  n = min(n, experiment.make_dataset(config, "test", batch_size=1).num_examples)
  test = experiment.make_dataset(config, "test", batch_size=n)
  # A latent run's network sees latents; its test images stay pixels.
  shape = run.spec.image_shape if run.spec.latent is None else run.spec.latent.image_shape
  return np.asarray(next(test.iterate_once())["image"]).reshape(-1, *shape)[:n]


def sampler_panel(run: programs.Run, methods: Sequence[str], num_samples: int, seed: int = 0,
                  threshold: str = "none") -> tuple[dict, dict, dict]:
  """Every method of `methods` (settings `DEMO_SAMPLERS`) from the same x_T.

  Args:
    run: the trained run (`programs.load_run`).
    methods: names of `DEMO_SAMPLERS`.
    num_samples: samples per method (divisible by the devices).
    seed: seed of x_T and the samplers' noise.
    threshold: clipping of the denoised estimate (`sampling.THRESHOLDS`) for the methods
      that take one.

  Returns:
    `(samples, stats, data_stats)`: per method the images `[N, H, W, C]` in [0, 1] units
    (unclipped); `{"step", "methods": {method: pixel_stats + nfe, seconds, options}}`; the
    `pixel_stats` of up to 256 test images.

  Raises:
    ValueError: an unknown method or threshold, or a batch the devices do not divide.
  """
  check_samplers(methods)
  check_choice("threshold", threshold, sampling.THRESHOLDS)
  mesh = parallel.make_mesh()
  parallel.check_batch(num_samples, mesh, "num_samples")
  score_fn, sde = run.score_fn(), run.spec.sde
  shape = (num_samples, *run.spec.image_shape)
  key = jax.random.PRNGKey(seed)
  x_T = jax.device_put(sde.prior_sampling(jax.random.fold_in(key, _STREAM_PANEL_NOISE), shape),
                       NamedSharding(mesh, P("batch")))
  data_range = experiment.data_range(run.config)
  # A latent run's samples are decoded to pixels in [0, 1] (one compiled decoder for all).
  to_pixels = (run.spec.inverse_scaler if run.spec.latent is None
               else run.spec.latent.make_decode_fn(mesh))
  samples, stats = {}, {}
  for method in methods:
    options = dict(DEMO_SAMPLERS[method])
    if threshold != "none" and "threshold" in sampling.sampler_options(method):
      options.update(threshold=threshold, data_range=data_range)
    fn = jax.jit(lambda k, x, method=method, options=options: sampling.sample(
        k, score_fn, sde, shape, method=method, x_T=x, **options))
    start = time.perf_counter()
    x, nfe = jax.block_until_ready(fn(jax.random.fold_in(key, _STREAM_PANEL_SAMPLERS), x_T))
    seconds = time.perf_counter() - start
    samples[method] = np.asarray(to_pixels(x))
    stats[method] = dict(pixel_stats(samples[method]), nfe=int(nfe), seconds=seconds,
                         options={k: v for k, v in options.items() if k != "data_range"})
    print(f"{method:11s} NFE {int(nfe):4d}  {seconds:6.1f} s  saturated "
          f"{stats[method]['saturated']:.3f}  mean {stats[method]['mean']:.3f}  std "
          f"{stats[method]['std']:.3f}", flush=True)
  data_stats = pixel_stats(_test_images(run, 256))
  print(f"{'test data':11s} saturated {data_stats['saturated']:.3f}  mean "
        f"{data_stats['mean']:.3f}  std {data_stats['std']:.3f}", flush=True)
  return samples, dict(step=run.step, methods=stats), data_stats


def panel_quality(run: programs.Run, samples: dict, num_samples: int) -> dict:
  """Per method the quality metrics (`quality.sample_quality`) of its samples clipped to
  [0, 1], and under 'test data' those of as many test images: what a perfect sampler would
  score at this sample count."""
  config = run.config
  net = quality.get_feature_net(config)
  out = {"test data": quality.sample_quality(config, _test_images(run, num_samples), net)}
  for method, x in samples.items():
    out[method] = quality.sample_quality(config, np.clip(x, 0.0, 1.0), net)
  for name, result in out.items():
    print(f"{name:11s} " + "  ".join(f"{k} {v:.4g}" for k, v in result.items()
                                     if isinstance(v, float) and "seconds" not in k), flush=True)
  return out


def save_panel(samples: dict, stats: dict, path: str, *, overwrite: bool = False) -> str:
  """The samples of `sampler_panel` side by side in one PNG, titled with NFE and the
  saturated fraction (an existing `path` is replaced only with `overwrite`). Returns the
  path."""
  panels = {f"{m} (NFE {stats['methods'][m]['nfe']}, sat. "
            f"{100 * stats['methods'][m]['saturated']:.0f}%)": x for m, x in samples.items()}
  return images.save_side_by_side(panels, path, overwrite=overwrite, flag="--overwrite")


# ----------------------------------------------------------------------------------------
# The lecture notes' figures.


def save_rows(rows: list[tuple[str, np.ndarray]], path: pathlib.Path | str,
              column_titles: Sequence[str] | None = None) -> str:
  """One figure: each row a labelled strip of images `[K, H, W, C]` in [0, 1]. Returns the
  path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n_cols = max(len(r[1]) for r in rows)
  fig, axes = plt.subplots(len(rows), 1, figsize=(1.0 * n_cols + 1.2, 1.05 * len(rows) + 0.4),
                           squeeze=False)
  for ax, (label, strip) in zip(axes[:, 0], rows):
    grid = images.image_grid(strip, nrow=len(strip))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_yticks([])
    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    ax.set_xticks([])
  if column_titles:
    w = rows[0][1].shape[2]
    axes[0, 0].set_xticks([2 + i * (w + 2) + w / 2 for i in range(len(column_titles))])
    axes[0, 0].set_xticklabels(column_titles, fontsize=7)
    axes[0, 0].xaxis.tick_top()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return str(path)


def progressive_rows(run: programs.Run, key: jax.Array, steps: int, num_draws: int = 4,
                     columns: int = 10) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
  """Progressive generation: a DDIM trajectory (`trajectories.ddim_trajectory`, `steps`
  steps) of `num_draws` draws; per draw a row of the state x_t and one of its Tweedie
  estimate x0_hat at `columns` times. `key`: the figures' base key. Returns `(rows, column
  titles)`."""
  sde, score_fn = run.spec.sde, run.score_fn()
  eps = sampling.default_eps(sde)
  x_T = sde.prior_sampling(jax.random.fold_in(key, _STREAM_PROGRESSIVE),
                           (num_draws, *run.spec.image_shape))
  ts, xs, x0s = jax.jit(lambda x: trajectories.ddim_trajectory(score_fn, sde, x, steps, eps)
                        )(x_T)
  to01 = run.spec.inverse_scaler
  cols = np.round(np.linspace(0, steps - 1, columns)).astype(int)
  rows = []
  for i in range(num_draws):
    rows.append((f"x_t #{i}", np.asarray(to01(xs[cols, i]))))
    rows.append((f"x0_hat #{i}", np.asarray(to01(x0s[cols, i]))))
  return rows, [f"t={float(ts[c]):.2f}" for c in cols]


def interpolation_rows(run: programs.Run, key: jax.Array, pairs: int = 2, points: int = 9
                       ) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
  """Interpolation through the probability-flow ODE: `2 pairs` test images encoded to x_T
  (eps -> T), `trajectories.slerp` of each pair's codes at `points` weights, each point
  decoded (T -> eps). Per pair a row of the two images and one of the decodings. `key`: the
  figures' base key. Returns `(rows, column titles)`."""
  sde, score_fn = run.spec.sde, run.score_fn()
  eps = sampling.default_eps(sde)
  image_shape = run.spec.image_shape
  x01 = _test_images(run, 2 * pairs)
  encode = jax.jit(lambda k, x: likelihood.log_likelihood(
      k, score_fn, sde, x, rtol=1e-3, atol=1e-3, eps=eps)[1])
  z = encode(jax.random.fold_in(key, _STREAM_ENCODE), run.spec.scaler(jnp.asarray(x01)))
  weights = jnp.linspace(0.0, 1.0, points)
  codes = trajectories.slerp(z[0::2], z[1::2], weights)  # [points, pairs, *D]
  k = codes.shape[0] * codes.shape[1]
  decode = jax.jit(lambda z: sampling.sample(jax.random.fold_in(key, _STREAM_DECODE), score_fn, sde,
                                             z.shape, method="ode", x_T=z, eps=eps,
                                             **DEMO_SAMPLERS["ode"])[0])
  decoded = np.asarray(run.spec.inverse_scaler(decode(codes.reshape(k, *image_shape))))
  decoded = decoded.reshape(codes.shape)
  rows = []
  for pair in range(pairs):
    blank = [np.full_like(x01[0], 1.0)] * (points - 2)
    rows.append((f"pair {pair}: data", np.stack([x01[2 * pair], *blank, x01[2 * pair + 1]])))
    rows.append((f"pair {pair}: ODE", decoded[:, pair]))
  return rows, [f"w={float(w):.3g}" for w in weights]


def sampler_rows(run: programs.Run, key: jax.Array, methods: Sequence[str],
                 num_samples: int = 8) -> list[tuple[str, np.ndarray]]:
  """The same `num_samples` starting points x_T under every method (`DEMO_SAMPLERS`), one
  row each, labelled with the method and its NFE. `key`: the figures' base key."""
  check_samplers(methods)
  sde, score_fn = run.spec.sde, run.score_fn()
  x_T = sde.prior_sampling(jax.random.fold_in(key, _STREAM_ROWS_NOISE),
                           (num_samples, *run.spec.image_shape))
  rows = []
  for method in methods:
    fn = jax.jit(lambda k, x, method=method: sampling.sample(
        k, score_fn, sde, x.shape, method=method, x_T=x, **DEMO_SAMPLERS[method]))
    x, nfe = fn(jax.random.fold_in(key, _STREAM_ROWS_SAMPLERS), x_T)
    rows.append((f"{method}\nNFE {int(nfe)}", np.asarray(run.spec.inverse_scaler(x))))
  return rows


def lecture_figures(run: programs.Run, out_dir: str, *, seed: int = 0, ddim_steps: int = 100,
                    samplers: Sequence[str] = tuple(DEMO_SAMPLERS)) -> list[str]:
  """Writes the lecture notes' three PNGs into `out_dir` (made if missing):
  `lecture_progressive.png` (`progressive_rows`), `lecture_interpolation.png`
  (`interpolation_rows`) and `lecture_samplers.png` (`sampler_rows`). Returns their paths.

  Raises:
    ValueError: an unknown sampler, or `ddim_steps < 1`.
  """
  check_samplers(samplers)
  if ddim_steps < 1:
    raise ValueError(f"ddim_steps must be >= 1, got {ddim_steps}")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  key = jax.random.PRNGKey(seed)
  rows, titles = progressive_rows(run, key, ddim_steps)
  paths = [save_rows(rows, out / "lecture_progressive.png", titles)]
  rows, titles = interpolation_rows(run, key)
  paths.append(save_rows(rows, out / "lecture_interpolation.png", titles))
  rows = sampler_rows(run, key, samplers)
  paths.append(save_rows(rows, out / "lecture_samplers.png"))
  return paths
