#!/usr/bin/env bash
# The accelerator numbers in one run, as JSON lines written as they come (stdout and $OUT):
#   ours:       DDPM++ cont. (configs/cifar10_vp.py) and NCSN++ cont. (configs/cifar10_ve.py):
#               train step and forward img/s at batch 128, float32 and bfloat16; compile time;
#               peak memory; XLA FLOPs, achieved TFLOP/s, fraction of the chip's peak
#               (scripts/benchmark.py);
#   reference:  yang-song/score_sde_pytorch's DDPM++ and NCSN++ (its pure-torch ops) on the
#               same networks at the same batch (scripts/benchmark_reference.py);
#   startup:    a one-step training process, cold (empty compilation cache) and warm
#               (scripts/startup_benchmark.py --modes=train);
#   samplers:   per-NFE time of every sampler against a bare network call
#               (scripts/sampler_overhead.py);
#   dit:        the DiT sizes (scripts/benchmark.py --dit_size), float32 and bfloat16.
# Every line carries "section"; a failed or skipped section writes a line with "error" or
# "skipped" and the run goes on. Sections stop being started once BUDGET_S seconds have
# passed (default 450 on a GPU, so that the run ends within 8 minutes unless the last section
# runs long; unlimited with --tiny).
#
#   bash scripts/gpu_benchmark.sh              # on a GPU (jax[cuda] and CUDA torch installed)
#   bash scripts/gpu_benchmark.sh --tiny       # the same code path on a CPU, tiny sizes
#   TINY=1 OUT=/tmp/b.jsonl SECTIONS="ours samplers" bash scripts/gpu_benchmark.sh
#
# The reference is a checkout of yang-song/score_sde_pytorch in REFERENCE_DIR (default
# third_party/score_sde_pytorch, git-ignored; take it along to the GPU machine).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TINY=${TINY:-0}
if [ "${1:-}" = "--tiny" ]; then TINY=1; fi
PY=${PY:-python}
if [ -x .venv/bin/python ] && [ "$PY" = python ]; then PY=.venv/bin/python; fi
OUT=${OUT:-runs/gpu_benchmark.jsonl}
REFERENCE_DIR=${REFERENCE_DIR:-third_party/score_sde_pytorch}
BUDGET_S=${BUDGET_S:-}
SECTIONS=${SECTIONS:-"env ours reference startup samplers dit"}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
LOG="${OUT%.jsonl}.log"
: > "$LOG"

if [ "$TINY" = 1 ]; then
  # The same networks' code at a few channels and one resolution (the :tiny variants still
  # take minutes to compile on a loaded 2-core machine).
  BATCH=2; RUNS=2; STEPS=3; DEVICE=cpu; DITS="S/8"; SECTION_TIMEOUT=${SECTION_TIMEOUT:-1800}
  VP=configs/cifar10_vp.py:tiny; VE=configs/cifar10_ve.py:tiny
  BUDGET_S=${BUDGET_S:-1000000}
  NET=(--config.model.nf=4 --config.model.ch_mult=1 --config.model.num_res_blocks=1
       --config.model.attn_resolutions=8 --config.data.image_size=8)
else
  BATCH=128; RUNS=20; STEPS=10; DEVICE=cuda; DITS="S/2 B/2"; SECTION_TIMEOUT=${SECTION_TIMEOUT:-240}
  BUDGET_S=${BUDGET_S:-450}
  VP=configs/cifar10_vp.py; VE=configs/cifar10_ve.py
  NET=()
fi
# The same overrides in scripts/startup_benchmark.py's form (section.field=value).
NET_OVERRIDES=()
for flag in ${NET[@]+"${NET[@]}"}; do NET_OVERRIDES+=(--override="${flag#--config.}"); done
START=$(date +%s)

emit() {  # a JSON line of this script's own
  echo "$1" | tee -a "$OUT"
}

# Runs one measuring command; its JSON lines get "section" (and "label") in front.
measure() {
  local section=$1 label=$2; shift 2
  local elapsed=$(( $(date +%s) - START ))
  if [ "$elapsed" -ge "$BUDGET_S" ]; then
    emit "{\"section\": \"$section\", \"label\": \"$label\", \"skipped\": \"budget ${BUDGET_S} s spent\"}"
    return
  fi
  local t0=$(date +%s) rc
  timeout "$SECTION_TIMEOUT" "$@" 2>>"$LOG" \
    | sed -u "s|^{|{\"section\": \"$section\", \"label\": \"$label\", |" | tee -a "$OUT"
  rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    emit "{\"section\": \"$section\", \"label\": \"$label\", \"error\": \"exit $rc (see $LOG)\", \"seconds\": $(( $(date +%s) - t0 ))}"
  fi
}

wanted() { [[ " $SECTIONS " == *" $1 "* ]]; }

if wanted env; then
  measure env env "$PY" -c '
import json, platform, jax
d = jax.devices()[0]
print(json.dumps({"jax": jax.__version__, "platform": d.platform, "device_kind": d.device_kind,
                  "devices": jax.device_count(), "python": platform.python_version()}))'
  if [ "$TINY" != 1 ]; then
    "$PY" -c 'import jax, sys; sys.exit(jax.devices()[0].platform != "gpu")' 2>/dev/null \
      || emit '{"section": "env", "error": "jax sees no GPU: install jax[cuda] or run with --tiny"}'
  fi
fi

if wanted ours; then
  for config in "$VP" "$VE"; do
    for precision in float32 bfloat16; do
      measure ours "$config $precision" "$PY" scripts/benchmark.py --config="$config" \
        ${NET[@]+"${NET[@]}"} --batch_size="$BATCH" --runs="$RUNS" --precision="$precision" \
        --mode=both
    done
  done
fi

if wanted reference; then
  if [ ! -f "$REFERENCE_DIR/models/ncsnpp.py" ]; then
    emit "{\"section\": \"reference\", \"error\": \"no score_sde_pytorch checkout in $REFERENCE_DIR\"}"
  else
    measure reference "$VP" "$PY" scripts/benchmark_reference.py --reference_dir="$REFERENCE_DIR" \
      --config="$VP" ${NET[@]+"${NET[@]}"} --reference_config=configs/vp/cifar10_ddpmpp_continuous.py \
      --batch_size="$BATCH" --runs="$RUNS" --device="$DEVICE"
    measure reference "$VE" "$PY" scripts/benchmark_reference.py --reference_dir="$REFERENCE_DIR" \
      --config="$VE" ${NET[@]+"${NET[@]}"} --reference_config=configs/ve/cifar10_ncsnpp_continuous.py \
      --batch_size="$BATCH" --runs="$RUNS" --device="$DEVICE"
  fi
fi

if wanted startup; then
  # Time to the first train step (a whole one-step process, with the final test loss and one
  # checkpoint), cold then warm; synthetic data: no dataset needs to be on the machine.
  measure startup "$VP" "$PY" scripts/startup_benchmark.py --config="$VP" --modes=train \
    --warm_runs=1 --override=data.dataset=synthetic --override=training.batch_size="$BATCH" \
    --override=eval.batch_size="$BATCH" ${NET_OVERRIDES[@]+"${NET_OVERRIDES[@]}"}
fi

if wanted samplers; then
  measure samplers "$VP" "$PY" scripts/sampler_overhead.py --config="$VP" ${NET[@]+"${NET[@]}"} \
    --batch_size="$BATCH" \
    --steps="$STEPS" --runs="$RUNS"
fi

if wanted dit; then
  for size in $DITS; do
    for precision in float32 bfloat16; do
      measure dit "DiT-$size $precision" "$PY" scripts/benchmark.py --config="$VP" \
        ${NET[@]+"${NET[@]}"} \
        --dit_size="$size" --batch_size="$BATCH" --runs="$RUNS" --precision="$precision" \
        --mode=both
    done
  done
fi

emit "{\"section\": \"done\", \"tiny\": $TINY, \"seconds\": $(( $(date +%s) - START ))}"
