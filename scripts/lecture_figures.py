"""The lecture notes' pictures from any trained checkpoint.

    python scripts/lecture_figures.py --config=configs/fashion_mnist_vp.py \
        --workdir=runs/fashion_mnist_vp --out_dir=docs

Writes three PNGs into `out_dir` (EMA weights of the latest checkpoint):

- `lecture_progressive.png`: progressive generation. A deterministic DDIM trajectory from
  x_T to eps; at 10 of its times (columns) the state x_t and the network's estimate of the
  clean image, x0_hat = (x_t + sigma^2 score) / alpha (Tweedie), for 4 draws (row pairs).
- `lecture_interpolation.png`: two test images encoded to x_T by the probability-flow ODE
  (t = eps -> T), spherical interpolation of the two codes, each point decoded by the ODE
  (T -> eps), for 2 pairs.
- `lecture_samplers.png`: the same 8 starting points x_T under every sampler (rows).
"""

from __future__ import annotations

import pathlib
import time

import common  # noqa: F401  scripts/common.py: the repository root on sys.path
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from score_sde.io import datasets, images
from score_sde.run import evaluate
from score_sde import likelihood, models, sampling
from score_sde.sde import batch_scalar  # noqa: E402

# Sampler settings of the sampler panel (NFE about 300 / adaptive / 51 / 26 / 35 / 200).
SAMPLERS = {
    "pc": dict(predictor="reverse_diffusion", corrector="langevin", steps=150),
    "ode": dict(solver="tsit5", rtol=1e-3, atol=1e-3),
    "ddim": dict(steps=50),
    "dpm_solver": dict(steps=25, order=2),
    "heun": dict(steps=18),
    "ddpm": dict(steps=200),
}

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command-line flags (defined only when run as a script, so that tests can import
  this module next to others that define --config)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=False)
  flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.")
  flags.DEFINE_string("out_dir", "docs", "Where the PNGs go.")
  flags.DEFINE_integer("seed", 0, "Seed of the starting noise.")
  flags.DEFINE_integer("ddim_steps", 100, "Steps of the progressive-generation trajectory.")
  flags.DEFINE_list("samplers", list(SAMPLERS), "Rows of lecture_samplers.png.")
  flags.mark_flags_as_required(["config", "workdir"])


def ddim_trajectory(score_fn, sde, x_T: jax.Array, steps: int, eps: float
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Deterministic DDIM from T to eps, keeping every state: `(ts [steps], xs [steps, B, *D],
  x0_hats [steps, B, *D])`, the state x_t at each grid time and its Tweedie estimate."""
  ts = jnp.linspace(sde.T, eps, steps + 1)

  def body(x, ts_pair):
    t, s = ts_pair
    tb = jnp.full(x.shape[:1], t)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    x0 = (x + sigma**2 * score_fn(x, tb)) / alpha
    eps_hat = (x - alpha * x0) / sigma
    return sde.alpha(s) * x0 + sde.sigma(s) * eps_hat, (x, x0)

  _, (xs, x0s) = jax.lax.scan(body, x_T, (ts[:-1], ts[1:]))
  return ts[:-1], xs, x0s


def slerp(z0: jax.Array, z1: jax.Array, w: jax.Array) -> jax.Array:
  """Spherical interpolation of `[B, *D]` codes at weights `w: [K]` -> `[K, B, *D]`."""
  flat0, flat1 = z0.reshape(z0.shape[0], -1), z1.reshape(z1.shape[0], -1)
  cos = jnp.sum(flat0 * flat1, -1) / (jnp.linalg.norm(flat0, axis=-1)
                                      * jnp.linalg.norm(flat1, axis=-1))
  omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  w = w[:, None]
  a = jnp.sin((1.0 - w) * omega) / jnp.sin(omega)
  b = jnp.sin(w * omega) / jnp.sin(omega)
  return (batch_scalar(a, z0[None]) * z0[None] + batch_scalar(b, z1[None]) * z1[None])


def _save_rows(rows: list[tuple[str, np.ndarray]], path: pathlib.Path, column_titles=None):
  """One figure: each row a labelled strip of images in [0, 1]."""
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
    h, w = rows[0][1].shape[1:3]
    axes[0, 0].set_xticks([2 + i * (w + 2) + w / 2 for i in range(len(column_titles))])
    axes[0, 0].set_xticklabels(column_titles, fontsize=7)
    axes[0, 0].xaxis.tick_top()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(path, flush=True)


def main(argv) -> None:
  del argv
  from score_sde.io import logs
  logs.setup_logging()
  config = FLAGS.config
  out_dir = pathlib.Path(FLAGS.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  state, step, model, sde = evaluate.load_checkpoint(config, FLAGS.workdir)
  score_fn = models.get_score_fn(sde, model, state.variables(ema=True), train=False,
                                 continuous=bool(config.training.continuous))
  to01 = datasets.get_data_inverse_scaler(config.data.centered)
  scaler = datasets.get_data_scaler(config.data.centered)
  image_shape = models.image_shape(config)
  key = jax.random.PRNGKey(FLAGS.seed)
  eps = sampling.default_eps(sde)
  start = time.perf_counter()

  # 1. Progressive generation.
  x_T = sde.prior_sampling(jax.random.fold_in(key, 0), (4, *image_shape))
  ts, xs, x0s = jax.jit(lambda x: ddim_trajectory(score_fn, sde, x, FLAGS.ddim_steps, eps)
                        )(x_T)
  cols = np.round(np.linspace(0, FLAGS.ddim_steps - 1, 10)).astype(int)
  rows = []
  for i in range(x_T.shape[0]):
    rows.append((f"x_t #{i}", np.asarray(to01(xs[cols, i]))))
    rows.append((f"x0_hat #{i}", np.asarray(to01(x0s[cols, i]))))
  _save_rows(rows, out_dir / "lecture_progressive.png",
             [f"t={float(ts[c]):.2f}" for c in cols])

  # 2. Interpolation through the probability-flow ODE.
  test = datasets.get_dataset(config, "test", batch_size=8)
  x01 = np.asarray(next(iter(test))["image"]).reshape(-1, *image_shape)[:4]
  x = scaler(jnp.asarray(x01))
  encode = jax.jit(lambda k, x: likelihood.log_likelihood(
      k, score_fn, sde, x, rtol=1e-3, atol=1e-3, eps=eps)[1])
  z = encode(jax.random.fold_in(key, 1), x)
  weights = jnp.linspace(0.0, 1.0, 9)
  codes = slerp(z[0::2], z[1::2], weights)  # [9, 2, *D]
  k = codes.shape[0] * codes.shape[1]
  decode = jax.jit(lambda z: sampling.sample(jax.random.fold_in(key, 2), score_fn, sde,
                                             z.shape, method="ode", x_T=z, eps=eps,
                                             **SAMPLERS["ode"])[0])
  decoded = np.asarray(to01(decode(codes.reshape(k, *image_shape)))).reshape(codes.shape)
  rows = []
  for pair in range(codes.shape[1]):
    rows.append((f"pair {pair}: data", np.stack([x01[2 * pair]] + [np.full_like(x01[0], 1.0)]
                                                * 7 + [x01[2 * pair + 1]])))
    rows.append((f"pair {pair}: ODE", decoded[:, pair]))
  _save_rows(rows, out_dir / "lecture_interpolation.png",
             [f"w={float(w):.3g}" for w in weights])

  # 3. The same x_T under every sampler.
  x_T = sde.prior_sampling(jax.random.fold_in(key, 3), (8, *image_shape))
  rows = []
  for method in FLAGS.samplers:
    fn = jax.jit(lambda k, x: sampling.sample(k, score_fn, sde, x.shape, method=method,
                                              x_T=x, **SAMPLERS[method]))
    x, nfe = fn(jax.random.fold_in(key, 4), x_T)
    rows.append((f"{method}\nNFE {int(nfe)}", np.asarray(to01(x))))
  _save_rows(rows, out_dir / "lecture_samplers.png")
  print(f"checkpoint step {step}; {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
