#!/usr/bin/env bash
# The guidance demo (not part of scripts/demo.sh): train the demo's DDPM++ class-conditionally
# on Fashion-MNIST with 10% label dropout, then write per-class grids at CFG weights 0, 1, 3,
# an inpainting grid of test images and the class accuracy of guided samples against the
# weight (judged by the metrics work's Fashion-MNIST classifier) into docs/guidance/.
#
#   bash scripts/demo_guidance.sh                       # STEPS=2000 by default
#   STEPS=600 JUDGE=noise_classifier bash scripts/demo_guidance.sh
#
# JUDGE=noise_classifier also trains this run's noise-conditional classifier and judges with
# it at the smallest noise level (when the metrics work's classifier is not available).
# Needs Fashion-MNIST as scripts/demo.sh (run that first for the environment and data).
# Re-running resumes the training where it stopped (or skips it when done).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STEPS=${STEPS:-2000}
WORKDIR=${WORKDIR:-runs/fashion_mnist_cond}
OUT=${OUT:-docs/guidance}
JUDGE=${JUDGE:-fmnist}
PY=${PY:-.venv/bin/python}
source scripts/cpu_env.sh  # one simulated device per core; TCMalloc when installed
one_device_per_core
use_tcmalloc
CONFIG=configs/fashion_mnist_cond.py
COMMON=(--config="$CONFIG" --workdir="$WORKDIR" --config.training.n_iters="$STEPS")

$PY -m score_sde.main "${COMMON[@]}" --mode=train \
  --config.training.snapshot_freq=500 --config.training.snapshot_freq_for_preemption=250
if [ "$JUDGE" = noise_classifier ]; then
  $PY -m score_sde.main "${COMMON[@]}" --mode=train_classifier
fi
$PY scripts/guidance_demo.py --workdir="$WORKDIR" --out="$OUT" --judge="$JUDGE"
