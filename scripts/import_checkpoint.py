"""Imports a published checkpoint into a workdir of this project.

    python scripts/import_checkpoint.py --config=configs/cifar10_vp.py \\
        --checkpoint=checkpoint_8.pth --workdir=runs/published_vp
    python -m score_sde.main --config=configs/cifar10_vp.py --workdir=runs/published_vp \\
        --mode=sample --config.sampling.method=ode

`--config` takes the same `path.py[:arg]` and `--config.<section>.<field>=value` overrides
as `score_sde.main`, so a network of another size is imported by overriding its fields (see
docs/checkpoints.md for the overrides of every published checkpoint). The EMA weights become
the EMA parameters (used by sampling and evaluation), the model weights the parameters, the
step the step; the optimizer state starts fresh. The file is read without executing pickled
code, and without torch. A workdir that already has checkpoints (or another run's
`config.json`) is refused unless `--overwrite`; then the new checkpoint is written
completely first, and only then are the old checkpoints moved to
`checkpoints_set_aside/` (never deleted) and an old config kept as `config.<k>.json`. An
interrupt at any moment leaves the old state or the new one.

DiT checkpoints of facebookresearch/DiT (a bare state dict such as the published
`DiT-XL-2-256x256.pt`, or a train.py checkpoint with "model" / "ema"; EMA weights -> EMA
params), for a DiT config of the same size:

    python scripts/import_checkpoint.py --format=dit --config=configs/imagenet256_dit.py:XL/2 \\
        --checkpoint=DiT-XL-2-256x256.pt --workdir=runs/dit_xl2

KL autoencoders (latent diffusion's first stage; no --config, the architecture comes from the
folder's config.json or is inferred from the LDM state dict's shapes):

    python scripts/import_checkpoint.py --format=diffusers_vae --checkpoint=sd-vae-ft-mse \\
        --workdir=runs/sd_vae
    python scripts/import_checkpoint.py --format=ldm_vae \\
        --checkpoint=vae-ft-mse-840000-ema-pruned.ckpt --workdir=runs/sd_vae
    python scripts/import_checkpoint.py --format=ldm_vae --checkpoint=v1-5-pruned-emaonly.ckpt \
        --yaml=v1-inference.yaml --workdir=runs/sd_vae

write `runs/sd_vae/autoencoder/`, which `score_sde.run.load_autoencoder` and
`--config.data.latent=runs/sd_vae` read. `--yaml` (ldm_vae only) takes the SD / LDM YAML of
the checkpoint (a full config, `model.params.first_stage_config`, or a first-stage config):
the architecture is then its `ddconfig` / `embed_dim`, checked against the weights' shapes,
and the latent scale its `model.params.scale_factor` (without it: SD's 0.18215).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from score_sde.run import cli, reference

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py) whose "
                                "network the checkpoint holds (--format=score_sde | dit).",
                                lock_config=True)
flags.DEFINE_string("checkpoint", None, "The checkpoint: a score_sde_pytorch .pth, a "
                    "facebookresearch/DiT .pt, a diffusers AutoencoderKL folder, or an LDM / SD "
                    ".ckpt / .safetensors.")
flags.DEFINE_string("format", "score_sde", "What the checkpoint is: "
                    f"{' | '.join(reference.FORMATS)}.")
flags.DEFINE_string("workdir", None, "The run directory to write the checkpoint into.")
flags.DEFINE_string("yaml", None, "--format=ldm_vae: the checkpoint's Stable Diffusion / LDM "
                    "YAML (architecture and scale_factor from it, checked against the weights).")
flags.DEFINE_bool("overwrite", False, "Import into a workdir that has checkpoints or another "
                  "config.json (the old ones are set aside, never deleted).")
flags.mark_flags_as_required(["checkpoint", "workdir"])
cli.check_flag("format", cli.choice(reference.FORMATS))
cli.check_flag("checkpoint", cli.existing_file)
cli.check_flag("yaml", cli.existing_file)


def main(argv) -> None:
  del argv
  cli.setup()

  def work():
    info = reference.import_any(FLAGS.format, FLAGS.checkpoint, FLAGS.workdir,
                                config=FLAGS.config, overwrite=FLAGS.overwrite,
                                yaml_path=FLAGS.yaml)
    if "autoencoder" in info:
      print(f"imported {FLAGS.format} into {info['autoencoder']} (scaling_factor "
            f"{info['scaling_factor']})")
    else:
      print(f"imported step {info['step']} into {FLAGS.workdir} (optimizer state "
            "re-initialized)")

  sys.exit(cli.execute(work))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
