"""Score networks in Flax (NCSN++ / DDPM++ and the DDPM U-Net), and `ScoreModel`, the wrapper
that turns any of them into a score function of a forward process.

`NCSNpp` is the one U-Net skeleton; `DDPM` is its preset with DDPM's blocks and resampling.

    network = models.MODELS["ncsnpp"](nf=64, ...)      # run.networks.get_model(config)
    variables = models.init_network(key, network, (H, W, C))   # {'params', maybe 'constants'}
    sm = models.ScoreModel(network, sde, parameterization="auto", continuous=True)
    score_fn = sm.score_fn(variables)                  # (x [B, H, W, C], t [B]) -> score
    bf16 = sm.with_network(models.with_precision(network, "bfloat16"))  # same variables

`variables['constants']` (present with Fourier embeddings) holds frozen arrays: keep them with
the model (checkpoints, EMA copies, replication) but optimize only `variables['params']`.
Count parameters without memory with
`models.count_params(jax.eval_shape(lambda k: models.init_network(k, network, shape), key))`.
"""

from score_sde.models.autoencoder import AutoencoderKL
from score_sde.models.autoencoder import DiagonalGaussian
from score_sde.models.build import MODELS
from score_sde.models.build import PRECISIONS
from score_sde.models.build import Variables
from score_sde.models.build import count_params
from score_sde.models.build import init_network
from score_sde.models.build import with_precision
from score_sde.models.ddpm import DDPM
from score_sde.models.layers import CONSTANTS
from score_sde.models.ncsnpp import NCSNpp
from score_sde.models.score_model import ScoreModel

__all__ = ["CONSTANTS", "DDPM", "MODELS", "NCSNpp", "PRECISIONS", "ScoreModel", "Variables",
           "AutoencoderKL", "DiagonalGaussian", "count_params", "init_network", "with_precision"]
