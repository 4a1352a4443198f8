"""The per-NFE sampler timing of scripts/sampler_overhead.py and scripts/gpu_benchmark.sh
(`score_sde.run.overhead`), on a tiny network: its rows, their NFE and bad input."""

import jax
import numpy as np
import pytest

from configs import fashion_mnist_vp
from score_sde import sampling, sde as sde_lib
from score_sde.run import overhead


def tiny_config():
  config = fashion_mnist_vp.get_config("tiny")
  config.data.image_size = 8
  config.model.nf, config.model.ch_mult, config.model.attn_resolutions = 4, (1,), ()
  return config


def test_rows_and_nfe_match_the_samplers():
  rows = list(overhead.sampler_overhead(tiny_config(), batch_size=2, steps=3,
                                        methods=["ddim", "ode"], ode_tol=1e-2, runs=2))
  assert [r["mode"] for r in rows] == ["bare_score", "sampler", "sampler"]
  assert [r.get("method") for r in rows] == [None, "ddim", "ode"]
  assert rows[0]["median_ms"] > 0
  # A fixed-step sampler's NFE does not depend on the score: the same as with any score.
  sde = sde_lib.VPSDE()
  _, nfe = jax.jit(lambda k: sampling.sample(k, lambda x, t: -x, sde, (2, 8, 8, 1), "ddim",
                                             steps=3))(jax.random.key(0))
  assert rows[1]["nfe"] == int(nfe) and rows[2]["nfe"] > 1
  for r in rows[1:]:
    assert r["ms_per_nfe"] == pytest.approx(r["median_ms"] / r["nfe"], rel=1e-2, abs=1e-3)
    assert np.isfinite(r["per_nfe_over_bare"]) and r["per_nfe_over_bare"] > 0


def test_bad_method_fails_before_compiling():
  with pytest.raises(ValueError, match=r"Unknown sampling method 'euler'.*'ddim'"):
    next(overhead.sampler_overhead(tiny_config(), batch_size=2, methods=["euler"]))
  with pytest.raises(ValueError, match="steps must be >= 2"):
    next(overhead.sampler_overhead(tiny_config(), batch_size=2, steps=1))
