"""score_sde: score-based generative modeling through SDEs, in JAX/Flax.

Modules (see DESIGN.md): `sde` (forward SDEs), `losses` (denoising score matching),
`sampling` (PC, ODE, DDPM, DDIM, Heun, DPM-Solver++), `likelihood` (bits/dim),
`models` (NCSN++ / DDPM++ / DDPM), `solvers` (diffrax ODE solvers, NFE), `datasets`,
`experiment` (config -> objects, checks), `parallel` (mesh, sharding), `train`, `evaluate`,
`checkpoints`, `workdir`, `compilation_cache`, `main`, `reference_checkpoints` / `torch_zip`
(score_sde_pytorch checkpoints, read without torch).
Submodules are imported explicitly (`from score_sde import sampling`); importing the package
itself loads nothing heavy.
"""

__version__ = "0.1.0"
