#!/bin/bash
# The pixel demo and the latent demo at one wall-clock budget: both trained at the same time,
# each pinned to one core with one XLA device, so that both see the same machine load.
#   B=1500 B1=500 bash scripts/latent_budget.sh   # B s in all; phase 1 gets B1 s, phase 2 the rest
# Each process is killed at its budget; checkpoints every 100 steps, so the newest checkpoint
# is what the budget bought. Then score both (README, "Latent diffusion"):
#   python scripts/sampler_panel.py --workdir=runs/budget/pixel --methods=dpm_solver \
#       --num_samples=256 --quality --out=runs/budget/pixel_panel.png
#   (the same with runs/budget/latent)
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
. scripts/cpu_env.sh
use_tcmalloc
export XLA_FLAGS=--xla_force_host_platform_device_count=1
B=${B:-1500}; B1=${B1:-500}
R=runs/budget
rm -rf $R; mkdir -p $R
common="--config.training.snapshot_sampling=False --config.training.snapshot_freq=100 --config.training.snapshot_freq_for_preemption=100 --config.training.n_iters=1000000"
(
  s=$(date +%s)
  echo "pixel start $(date -u +%T)"
  timeout -s KILL $B taskset -c 0 nice -n 5 "$PY" -m score_sde.main --config=configs/fashion_mnist_vp.py --workdir=$R/pixel --mode=train $common > $R/pixel.log 2>&1
  echo "pixel end $(date -u +%T) rc $? elapsed $(( $(date +%s) - s ))"
) &
(
  s=$(date +%s)
  echo "ae start $(date -u +%T)"
  timeout -s KILL $B1 taskset -c 1 nice -n 5 "$PY" -m score_sde.main --config=configs/fashion_mnist_latent.py --workdir=$R/ae --mode=train_autoencoder --config.autoencoder.n_iters=1000000 --config.autoencoder.snapshot_freq=100 --config.autoencoder.eval_freq=500 > $R/ae.log 2>&1
  e=$(( $(date +%s) - s ))
  echo "ae end $(date -u +%T) rc $? elapsed $e"
  timeout -s KILL $(( B - e )) taskset -c 1 nice -n 5 "$PY" -m score_sde.main --config=configs/fashion_mnist_latent.py --workdir=$R/latent --config.data.latent=$R/ae --mode=train $common > $R/latent.log 2>&1
  echo "latent end $(date -u +%T) rc $? elapsed $(( $(date +%s) - s ))"
) &
wait
echo "both done $(date -u +%T)"
