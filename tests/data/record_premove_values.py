"""Run with PYTHONPATH=<checkout of f6870d4>: records the fixture run's parameters, EMA
parameters and the EMA network's score at fixed (x, t), with that commit's own API."""
import sys
import jax, jax.numpy as jnp, numpy as np
from configs import fashion_mnist_vp
from score_sde import evaluate, models

workdir, out = sys.argv[1:3]
config = fashion_mnist_vp.get_config("tiny")
for path, value in {"data.dataset": "synthetic", "data.image_size": 4, "model.ch_mult": (1,),
                    "model.attn_resolutions": (), "model.nf": 4, "training.batch_size": 2,
                    "training.n_iters": 4, "training.snapshot_freq": 4,
                    "training.snapshot_freq_for_preemption": 4, "training.eval_freq": 4,
                    "training.log_freq": 1, "optim.warmup": 2,
                    "training.snapshot_sampling": False}.items():
  section, field = path.split(".")
  config[section][field] = value
state, step, model, sde = evaluate.load_checkpoint(config, workdir)
x = np.random.default_rng(0).standard_normal((2, 4, 4, 1)).astype(np.float32)
t = np.array([0.3, 0.7], np.float32)
record = {"step": np.asarray(step), "x": x, "t": t}
for name, ema in (("ema", True), ("params", False)):
  variables = jax.device_get(state.variables(ema=ema))
  for p, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    record[f"{name}{jax.tree_util.keystr(p)}"] = np.asarray(leaf)
  score_fn = models.get_score_fn(sde, model, state.variables(ema=ema), train=False,
                                 continuous=bool(config.training.continuous))
  record[f"score_{name}"] = np.asarray(score_fn(jnp.asarray(x), jnp.asarray(t)))
np.savez(out, **record)
print({k: v.shape for k, v in record.items() if not k.startswith(("ema[", "params["))}, len(record))
