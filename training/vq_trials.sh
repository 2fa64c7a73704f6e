#!/usr/bin/env bash
# VQ trials side by side (one device command, < 10 min): world data once, then one `vq.py` per
# trial, each on its own GPU, all warm-started from ROOT's VQ and trained on the same data. For
# choosing a VQ (judged afterwards with `tessera eval --roundtrip` on the CPU) before any LM
# is trained on its codes. Nothing is encoded.
#
#   TRIAL_0="--grow-codebook 8192 ..." TRIAL_1="..." bash training/vq_trials.sh RUN [OUTDIR]
#
# Trial i runs `vq.py --run RUN/trial_i --init ROOT --seconds VQ_SECONDS $TRIAL_i` on GPU i
# (CUDA_VISIBLE_DEVICES=i); with GPUS_PER_TRIAL=g, on GPUs i*g .. i*g+g-1, data parallel
# (`vq.py --gpus g`: one trial on both GPUs of two is TRIAL_0 with GPUS_PER_TRIAL=2).
# RUN/trial_i/data links to RUN/data. OUTDIR gets, per trial,
# trial_i.safetensors (the VQ, as stage A's vq.safetensors) and trial_i.tar (vq_log.csv,
# summary.json, recon.png, console.log), and vq_trials.log: 2 files per trial, so at most 3
# trials fit the 8 files that one call brings back.
# Environment: ROOT (default .), BUDGET (540), RESERVE (120: loading, final checks, copying),
# VQ_MAX (420), PY, WORLD, PROCS, DATA_ARGS, GPUS_PER_TRIAL (1), TRIAL_0 .. TRIAL_3.
set -euo pipefail
RUN=${1:?usage: bash training/vq_trials.sh RUN [OUTDIR]}
OUTDIR=${2:-${OUT:?set OUT or pass OUTDIR}}
ROOT=${ROOT:-.}
BUDGET=${BUDGET:-540}
RESERVE=${RESERVE:-120}
VQ_MAX=${VQ_MAX:-420}
PY=${PY:-python3}
WORLD=${WORLD:-target/release/tessera}
PROCS=${PROCS:-16}
G=${GPUS_PER_TRIAL:-1}
START=$(date +%s)
export PYTHONUNBUFFERED=1
mkdir -p "$RUN" "$OUTDIR"
LOG="$RUN/vq_trials.log"

trials=()
for i in 0 1 2 3; do
  v="TRIAL_$i"
  [ -n "${!v:-}" ] && trials+=("$i")
done
[ "${#trials[@]}" -gt 0 ] || { echo "[trials] set TRIAL_0 (and TRIAL_1 ...) to vq.py arguments"; exit 1; }

pack() {
  for i in "${trials[@]}"; do
    d="$RUN/trial_$i"
    [ -f "$d/vq/vq.safetensors" ] && cp "$d/vq/vq.safetensors" "$OUTDIR/trial_$i.safetensors"
    (cd "$d" 2>/dev/null && tar -cf "$OUTDIR/trial_$i.tar" --ignore-failed-read \
      vq/vq_log.csv vq/summary.json vq/recon.png console.log 2>/dev/null) || true
  done
  cp "$LOG" "$OUTDIR/vq_trials.log" 2>/dev/null || true
}
trap pack EXIT

{
  echo "[trials] start $(date -u +%FT%TZ) run=$RUN budget=${BUDGET}s trials ${trials[*]} from $ROOT"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "[trials] no nvidia-smi"
  $PY training/data.py --run "$RUN" --world "$WORLD" --procs "$PROCS" ${DATA_ARGS:-}
  ELAPSED=$(( $(date +%s) - START ))
  VQ_SECONDS=$(( BUDGET - ELAPSED - RESERVE ))
  if [ "$VQ_SECONDS" -gt "$VQ_MAX" ]; then VQ_SECONDS=$VQ_MAX; fi
  if [ "$VQ_SECONDS" -lt 30 ]; then VQ_SECONDS=30; fi
  echo "[trials] data done at ${ELAPSED}s; each VQ gets ${VQ_SECONDS}s"
  pids=()
  for i in "${trials[@]}"; do
    v="TRIAL_$i"
    d="$RUN/trial_$i"
    mkdir -p "$d"
    ln -sfn "$RUN/data" "$d/data"
    gpus=$(seq -s, $((i * G)) $((i * G + G - 1)))
    par=""
    [ "$G" -gt 1 ] && par="--gpus $G"
    echo "[trials] trial $i on GPU $gpus: ${!v} $par"
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=$gpus $PY training/vq.py --run "$d" --init "$ROOT" --seconds "$VQ_SECONDS" ${!v} $par \
      > "$d/console.log" 2>&1 &
    pids+=($!)
  done
  status=0
  for n in "${!pids[@]}"; do
    if wait "${pids[$n]}"; then r=0; else r=$?; status=1; fi
    i=${trials[$n]}
    echo "[trials] trial $i exited $r"
    grep -E "held-out|trained|grow|usage" "$RUN/trial_$i/console.log" | tail -n 6 || true
  done
  echo "[trials] done in $(( $(date +%s) - START ))s"
  exit $status
} 2>&1 | tee "$LOG"
