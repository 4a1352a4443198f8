#!/usr/bin/env bash
# The main job on the embedded default: train a small DDPM++ with the VP SDE on Fashion-MNIST
# on the CPU, then draw samples with every sampler (reverse-SDE predictor-corrector,
# probability-flow ODE, DDIM, DPM-Solver++, EDM Heun) from the same noise, and compute the
# test bits/dim.
#
#   bash scripts/demo.sh                      # about 20 minutes on 2 CPU cores (see README)
#   STEPS=2000 WORKDIR=runs/fm bash scripts/demo.sh
#
# Re-running resumes the training where it stopped (or skips it when done).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STEPS=${STEPS:-600}              # optimizer steps (batch 64)
WORKDIR=${WORKDIR:-runs/fashion_mnist_vp}
NUM_SAMPLES=${NUM_SAMPLES:-36}   # per sampler
BPD_EXAMPLES=${BPD_EXAMPLES:-32} # test images for bits/dim
DATA_DIR=/usr/share/datasets/fashion-mnist

# 1. The environment (as scripts/test.sh): .venv at the repository root.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
PY=.venv/bin/python

# 2. The data: Debian's dataset-fashion-mnist package.
if ! ls "$DATA_DIR"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  echo "Fashion-MNIST is not in $DATA_DIR; installing Debian's dataset-fashion-mnist ..."
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
    # TCMalloc makes the CPU train step faster (scripts/cpu_env.sh); optional.
    $SUDO apt-get install -y -qq libtcmalloc-minimal4 || true
  else
    echo "error: cannot install it here. On Debian/Ubuntu run" >&2
    echo "  sudo apt-get install dataset-fashion-mnist" >&2
    echo "or put the four idx files (train-images-idx3-ubyte[.gz], ...) in a folder and" >&2
    echo "re-run with --config.data.data_dir set (see README)." >&2
    exit 1
  fi
fi

# One simulated JAX device per CPU core and TCMalloc when installed (scripts/cpu_env.sh).
source scripts/cpu_env.sh
one_device_per_core
use_tcmalloc
if [ -z "${LD_PRELOAD:-}" ] && [ "${SCORE_SDE_MALLOC:-tcmalloc}" = tcmalloc ]; then
  echo "note: TCMalloc is not installed; 'sudo apt-get install libtcmalloc-minimal4' makes" \
       "the training faster (scripts/cpu_env.sh)"
fi

CONFIG=configs/fashion_mnist_vp.py
COMMON=(--config="$CONFIG" --workdir="$WORKDIR" --config.training.n_iters="$STEPS")
start=$(date +%s)

# 3. Train (checkpoints and snapshot sample grids every 250 steps, resumable).
$PY -m score_sde.main "${COMMON[@]}" --mode=train \
  --config.training.snapshot_freq=250 --config.training.snapshot_freq_for_preemption=250
trained=$(date +%s)

# 4. Samples from the same starting noise: every sampler side by side in one PNG, with the
#    saturated-pixel fraction and pixel mean / std of each against the test images'.
$PY scripts/sampler_panel.py --workdir="$WORKDIR" \
  --out="$WORKDIR/all_samplers.png" --num_samples="$NUM_SAMPLES"
sampled=$(date +%s)

# 5. Test loss (whole test split) and bits/dim (probability-flow ODE at rtol = atol = 1e-4,
#    on the first BPD_EXAMPLES test images; published numbers use 1e-5 and the whole split,
#    which costs many more score evaluations).
$PY -m score_sde.main "${COMMON[@]}" --mode=eval --config.eval.enable_bpd=True \
  --config.eval.batch_size="$BPD_EXAMPLES" --config.eval.bpd_num_examples="$BPD_EXAMPLES" \
  --config.eval.bpd_rtol=1e-4 --config.eval.bpd_atol=1e-4
done_at=$(date +%s)
# Eval never overwrites: a re-run writes metrics.<i>.json; show the newest.
METRICS=$(ls -t "$WORKDIR"/eval/step_"$STEPS"/metrics*.json | head -1)

cat <<MSG

Done in $((done_at - start)) s (train $((trained - start)) s, sampling $((sampled - trained)) s, eval $((done_at - sampled)) s).
  every sampler (same noise):     $WORKDIR/all_samplers.png (numbers: all_samplers.json)
  snapshot samples (.npz, .png):  $WORKDIR/samples/
  test loss and bits/dim:         $METRICS
  checkpoints:                    $WORKDIR/checkpoints/
  TensorBoard:                    .venv/bin/python -m tensorboard.main --logdir $WORKDIR/tensorboard (if installed)
MSG
cat "$METRICS"
