"""Convergence orders of the multistep samplers UniPC and DEIS, on the exact Gaussian mixture.

As in tests/test_sampling.py: the pathwise error at eps against an independent float64
solution of the probability-flow ODE from the same x_T (diffrax, Dopri8, rtol = atol = 1e-12),
whose log-log slope over doubling step counts is the order. Measured (VP; VE within 0.1):

    unipc order 1 (+ UniC)     20-80 steps   1.97      (p + 1 = 2)
    unipc order 2 (+ UniC)     20-80         2.94      (3)
    unipc order 2, bh1         20-80         3.10      (3)
    unipc order 2, no UniC     20-80         1.98      (p = 2: the corrector adds the order)
    unipc order 3 (+ UniC)     40-160        3.85      (4; 3.92 over 80-320)
    deis order 1               20-80         0.98      (1)
    deis order 2               20-80         1.94      (2)
    deis order 3               80-320        3.02      (3; 3.8 over 20-80, pre-asymptotic)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import mixtures
from score_sde import sampling
from score_sde import sde as sde_lib
from tests.pf_reference import pf_ode_reference

SDES = {"vp": sde_lib.VPSDE(), "ve": sde_lib.VESDE()}
# A smooth two-component mixture (as the order tests of test_sampling.py): its data
# prediction varies gently in log-SNR, so the asymptotic orders show at few steps.
SMOOTH = mixtures.GaussianMixture(weights=(0.6, 0.4), means=((-0.6, 0.0), (0.6, 0.4)),
                                  stds=(0.5, 0.4), event_shape=(2,))


@functools.lru_cache(maxsize=None)
def _reference(sde_name):
  """(x_T [32, 2] float64, x at eps) from diffrax's Dopri8 in float64, one compiled program.
  Call under x64."""
  sde = SDES[sde_name]
  return pf_ode_reference(sde, SMOOTH.score_fn(sde), sde.t_max, sampling.default_eps(sde), 1e-12)


# (method, options, expected order, step counts)
ORDER_CASES = [
    ("unipc", dict(order=1), 2.0, (20, 40, 80)),
    ("unipc", dict(order=2), 3.0, (20, 40, 80)),
    ("unipc", dict(order=2, variant="bh1"), 3.0, (20, 40, 80)),
    ("unipc", dict(order=2, corrector=False), 2.0, (20, 40, 80)),
    ("unipc", dict(order=3), 4.0, (40, 80, 160)),
    ("deis", dict(order=1), 1.0, (20, 40, 80)),
    ("deis", dict(order=2), 2.0, (20, 40, 80)),
    ("deis", dict(order=3), 3.0, (80, 160, 320)),
]


# VP in the fast suite; VE (the same orders, within 0.1) with the slow tests.
@pytest.mark.parametrize("sde_name", ["vp", pytest.param("ve", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method,options,order,steps_list", ORDER_CASES,
                         ids=["-".join([m] + [f"{k}={v}" for k, v in o.items()])
                              for m, o, _, _ in ORDER_CASES])
def test_convergence_order(method, options, order, steps_list, sde_name):
  """UniPC-p with the UniC corrector converges at order p + 1, without it at p; DEIS at its
  order (log-log slope of the error within 0.35 of the order). The three step counts are one
  compiled program."""
  sde = SDES[sde_name]
  with jax.enable_x64(True):
    x_T, reference = _reference(sde_name)

    @jax.jit
    def rms_errors(key, x_T, reference):
      errors = []
      for steps in steps_list:
        x, nfe = sampling.sample(key, SMOOTH.score_fn(sde), sde, (32, 2), method=method,
                                 steps=steps, x_T=x_T, denoise=False, **options)
        assert x.dtype == jnp.float64 and nfe == steps  # both known when traced
        errors.append(jnp.sqrt(jnp.mean((x - reference) ** 2)))
      return errors

    errors = [float(e) for e in rms_errors(jax.random.key(0), x_T, reference)]
  slope = -np.polyfit(np.log(steps_list), np.log(errors), 1)[0]
  assert abs(slope - order) < 0.35, (errors, slope)
