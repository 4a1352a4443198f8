"""Score networks in Flax: NCSN++ / DDPM++ and the DDPM U-Net, and model -> score function.

`NCSNpp` is the one U-Net skeleton; `DDPM` is its preset with DDPM's blocks and resampling.

    model = models.get_model(config)                  # MODELS[config.model.name](config)
    variables = models.init_model(key, config)        # {'params', maybe 'constants'}
    out = model.apply(variables, x, labels, train=False, class_labels=None,
                      rngs={'dropout': key})          # x [B, H, W, C], labels [B]
    score_fn = models.get_score_fn(sde, model, variables, continuous=True)
    bf16_model = models.with_precision(model, 'bfloat16')  # same variables, bf16 compute

`variables['constants']` (present with Fourier embeddings) holds frozen arrays: keep them with
the model (checkpoints, EMA copies, replication) but optimize only `variables['params']`.
Count parameters without memory with
`models.count_params(jax.eval_shape(lambda k: models.init_model(k, config), key))`.
"""

from score_sde.models.build import MODELS
from score_sde.models.build import PRECISIONS
from score_sde.models.build import count_params
from score_sde.models.build import get_model
from score_sde.models.build import get_score_fn
from score_sde.models.build import image_shape
from score_sde.models.build import init_model
from score_sde.models.build import with_precision
from score_sde.models.ddpm import DDPM
from score_sde.models.layers import CONSTANTS
from score_sde.models.ncsnpp import NCSNpp

__all__ = ["CONSTANTS", "DDPM", "MODELS", "NCSNpp", "PRECISIONS", "count_params", "get_model",
           "get_score_fn", "image_shape", "init_model", "with_precision"]

# The KL autoencoder of latent diffusion (score_sde.models.autoencoder).
from score_sde.models.autoencoder import AutoencoderKL  # noqa: E402
from score_sde.models.autoencoder import DiagonalGaussian  # noqa: E402

__all__ += ["AutoencoderKL", "DiagonalGaussian"]
