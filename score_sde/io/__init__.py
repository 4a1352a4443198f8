"""Files and devices, no math and no config: datasets, checkpoints, the run directory, image
grids, logs, the compilation cache, device meshes and sharding, and the one restricted reader
of pickled files (`torch_zip`). Modules here import the library and each other, never
`score_sde.models` or `score_sde.run`."""
