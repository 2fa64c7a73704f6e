#!/usr/bin/env bash
# Stage A (one GPU command, < 10 min): world data + text tokenizer + VQ training + encode.
#
#   bash training/stage_a.sh RUN [OUTDIR]      (from the repo root; OUTDIR defaults to $OUT)
#
# RUN (a scratch directory on the GPU machine's local disk, outside the repository) keeps
# everything stage B needs while the machine stays warm.
# OUTDIR receives (7 files): vq.safetensors vq_log.csv recon.png vq_summary.json tokenizer.json
# tokenizer_config.json stage_a.log. Copy them to training/runs/stage_a/ before stage B: if the
# machine went cold, stage B rebuilds the data and codes from them.
# The VQ's time budget is what is left of BUDGET seconds after data + tokenizer, minus RESERVE_A
# (loading, final checks, encoding), capped at VQ_MAX.
# Warm start: WARM=ROOT (the repo root, with weights/ and tokenizer/) keeps ROOT's tokenizer (the
# LM's ids must not move) and continues ROOT's VQ (vq.py --init ROOT) instead of starting afresh.
# If the VQ's fast training forward fails, the VQ reruns once with transformers' forward.
# ENCODE=0 skips encoding the LM's data (a VQ-only trial; a cold stage B encodes it from the VQ).
# Environment overrides (CPU smoke tests): BUDGET RESERVE_A VQ_MAX PY WORLD PROCS DATA_ARGS TOK_ARGS VQ_ARGS WARM ENCODE
set -euo pipefail
RUN=${1:?usage: bash training/stage_a.sh RUN [OUTDIR]  (RUN: a scratch directory on the local disk)}
OUTDIR=${2:-${OUT:?set OUT or pass OUTDIR}}
BUDGET=${BUDGET:-540}
RESERVE_A=${RESERVE_A:-130}
VQ_MAX=${VQ_MAX:-360}
PY=${PY:-python3}
WORLD=${WORLD:-target/release/tessera}
PROCS=${PROCS:-16}
START=$(date +%s)
export PYTHONUNBUFFERED=1
mkdir -p "$RUN" "$OUTDIR"
LOG="$RUN/stage_a.log"

copy_out() {
  cp "$LOG" "$OUTDIR/stage_a.log" 2>/dev/null || true
  for f in vq/vq.safetensors vq/vq_log.csv vq/recon.png tokenizer/tokenizer.json tokenizer/tokenizer_config.json; do
    if [ -f "$RUN/$f" ]; then cp "$RUN/$f" "$OUTDIR/"; fi
  done
  if [ -f "$RUN/vq/summary.json" ]; then cp "$RUN/vq/summary.json" "$OUTDIR/vq_summary.json"; fi
}
trap copy_out EXIT

{
  echo "[stage A] start $(date -u +%FT%TZ) run=$RUN budget=${BUDGET}s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "[stage A] no nvidia-smi"
  $PY -c "import sys, torch, transformers, tokenizers, safetensors, numpy; print('[stage A] python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
  echo "[stage A] cores $(nproc), disk $(df -h "$RUN" | tail -1 | awk '{print $4}') free"
  $WORLD --version 2>/dev/null || true
  $PY training/data.py --run "$RUN" --world "$WORLD" --procs "$PROCS" ${DATA_ARGS:-}
  echo "[stage A] data done at $(( $(date +%s) - START ))s"
  if [ -n "${WARM:-}" ]; then
    mkdir -p "$RUN/tokenizer"
    cp "$WARM/tokenizer/tokenizer.json" "$WARM/tokenizer/tokenizer_config.json" "$RUN/tokenizer/"
    echo "[stage A] warm start from $WARM: its tokenizer kept"
    VQ_ARGS="--init $WARM ${VQ_ARGS:-}"
  else
    $PY training/tokenizer.py --run "$RUN" ${TOK_ARGS:-}
  fi
  ELAPSED=$(( $(date +%s) - START ))
  VQ_SECONDS=$(( BUDGET - ELAPSED - RESERVE_A ))
  if [ "$VQ_SECONDS" -gt "$VQ_MAX" ]; then VQ_SECONDS=$VQ_MAX; fi
  if [ "$VQ_SECONDS" -lt 30 ]; then VQ_SECONDS=30; fi
  echo "[stage A] tokenizer done at ${ELAPSED}s; VQ gets ${VQ_SECONDS}s"
  DEADLINE=$(( START + BUDGET - RESERVE_A ))
  ENC=--encode
  [ "${ENCODE:-1}" = 0 ] && ENC=
  if ! $PY training/vq.py --run "$RUN" --seconds "$VQ_SECONDS" $ENC ${VQ_ARGS:-}; then
    echo "[stage A] vq.py failed at $(( $(date +%s) - START ))s: rerunning with --hf-forward"
    $PY training/vq.py --run "$RUN" --seconds "$VQ_SECONDS" --deadline "$DEADLINE" $ENC --hf-forward ${VQ_ARGS:-}
  fi
  echo "[stage A] done in $(( $(date +%s) - START ))s"
} 2>&1 | tee "$LOG"
