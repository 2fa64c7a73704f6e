#!/usr/bin/env bash
# Stage B (one GPU command, < 10 min): LM training + export + reload/generate check + packing.
#
#   bash training/stage_b.sh RUN [OUTDIR]      (from the repo root; OUTDIR defaults to $OUT)
#
# Warm machine: uses RUN/codes, RUN/tokenizer and RUN/vq from stage A. Cold machine (no
# RUN/codes/DONE): copies vq.safetensors, tokenizer.json, tokenizer_config.json from FROM
# (default training/runs/stage_a, i.e. stage A's $OUT files put there), regenerates the same data
# (same seeds) and re-encodes it; the LM then gets correspondingly less time. With VQ_ROOT=ROOT
# (a model root) a cold machine takes the VQ from ROOT/weights and the tokenizer from
# ROOT/tokenizer instead (training/swap_vq.py --extract): a VQ can travel inside weights/.
# The LM's time budget is what is left of BUDGET seconds minus RESERVE_B (LM start-up, export,
# checks, packing), capped at LM_MAX.
# OUTDIR receives: ship.tar.part-00.. (tar of weights/ + tokenizer/, split in 15 MiB parts:
# `cat ship.tar.part-* | tar -x`), check.tar (export/check: greedy tokens JSON + PNGs + summary,
# lm_config.json), lm_log.csv, stage_b.log. If the export failed: lm_f16.tar.part-* instead
# (RUN/lm/{lm.safetensors (f16), lm_config.json}) so export.py can be rerun on the CPU machine.
# An --ema run's last weights (RUN/lm/lm_last.safetensors, f16) are packed apart, as
# RUN/last/lm_last.tar.part-* (tar of lm/lm_last.safetensors + lm/lm_config.json): with the
# export they would pass the 64 MiB that one call's $OUT brings back, so a second call fetches
# them (`bash training/gpu_run.sh last`, or copy them to $OUT yourself).
# Environment overrides (CPU smoke tests): BUDGET RESERVE_B LM_MAX PY WORLD PROCS FROM VQ_ROOT DATA_ARGS LM_ARGS ENCODE_ARGS
set -euo pipefail
RUN=${1:?usage: bash training/stage_b.sh RUN [OUTDIR]  (RUN: a scratch directory on the local disk)}
OUTDIR=${2:-${OUT:?set OUT or pass OUTDIR}}
BUDGET=${BUDGET:-540}
RESERVE_B=${RESERVE_B:-100}
LM_MAX=${LM_MAX:-450}
PY=${PY:-python3}
WORLD=${WORLD:-target/release/tessera}
PROCS=${PROCS:-16}
FROM=${FROM:-training/runs/stage_a}
START=$(date +%s)
export PYTHONUNBUFFERED=1
mkdir -p "$RUN" "$OUTDIR"
LOG="$RUN/stage_b.log"

pack() {
  cp "$LOG" "$OUTDIR/stage_b.log" 2>/dev/null || true
  if [ -f "$RUN/lm/lm_log.csv" ]; then cp "$RUN/lm/lm_log.csv" "$OUTDIR/"; fi
  if [ -f "$RUN/export/weights/config.json" ] && [ -f "$RUN/export/tokenizer/tokenizer.json" ]; then
    tar -C "$RUN/export" -cf "$RUN/ship.tar" weights tokenizer
    split -b 15M -d "$RUN/ship.tar" "$OUTDIR/ship.tar.part-"
    tar -C "$RUN" -cf "$OUTDIR/check.tar" export/check lm/lm_config.json 2>/dev/null || true
  elif [ -f "$RUN/lm/lm.safetensors" ]; then
    $PY -c "from safetensors.torch import load_file, save_file; sd = load_file('$RUN/lm/lm.safetensors'); save_file({k: v.half().contiguous() for k, v in sd.items()}, '$RUN/lm_f16.safetensors')" || true
    mkdir -p "$RUN/fallback/lm"
    cp "$RUN/lm_f16.safetensors" "$RUN/fallback/lm/lm.safetensors" 2>/dev/null || true
    cp "$RUN/lm/lm_config.json" "$RUN/fallback/lm/" 2>/dev/null || true
    tar -C "$RUN/fallback" -cf "$RUN/lm_f16.tar" lm
    split -b 15M -d "$RUN/lm_f16.tar" "$OUTDIR/lm_f16.tar.part-"
  fi
  if [ -f "$RUN/lm/lm_last.safetensors" ]; then
    mkdir -p "$RUN/last"
    tar -C "$RUN" -cf "$RUN/lm_last.tar" lm/lm_last.safetensors lm/lm_config.json
    split -b 15M -d "$RUN/lm_last.tar" "$RUN/last/lm_last.tar.part-"
  fi
  ls -la "$OUTDIR" >> "$OUTDIR/stage_b.log" 2>/dev/null || true
}
trap pack EXIT

rm -rf "$RUN/export" "$RUN/ship.tar" "$RUN/lm_f16.tar" "$RUN/lm_last.tar" "$RUN/last" "$RUN/fallback"
{
  echo "[stage B] start $(date -u +%FT%TZ) run=$RUN budget=${BUDGET}s"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "[stage B] no nvidia-smi"
  if [ ! -f "$RUN/codes/DONE" ]; then
    mkdir -p "$RUN/vq" "$RUN/tokenizer"
    if [ -n "${VQ_ROOT:-}" ]; then
      echo "[stage B] cold machine: rebuilding data and codes with the VQ of $VQ_ROOT/weights"
      $PY training/swap_vq.py --root "$VQ_ROOT" --extract "$RUN/vq/vq.safetensors"
      cp "$VQ_ROOT/tokenizer/tokenizer.json" "$VQ_ROOT/tokenizer/tokenizer_config.json" "$RUN/tokenizer/"
    else
      echo "[stage B] cold machine: rebuilding data and codes from $FROM"
      for f in vq.safetensors tokenizer.json tokenizer_config.json; do
        [ -f "$FROM/$f" ] || { echo "[stage B] missing $FROM/$f (stage A's \$OUT files)"; exit 1; }
      done
      cp "$FROM/vq.safetensors" "$RUN/vq/"
      cp "$FROM/tokenizer.json" "$FROM/tokenizer_config.json" "$RUN/tokenizer/"
    fi
    $PY training/data.py --run "$RUN" --world "$WORLD" --procs "$PROCS" --n-heldout 0 ${DATA_ARGS:-}
    $PY training/encode.py --run "$RUN" ${ENCODE_ARGS:-}
  fi
  ELAPSED=$(( $(date +%s) - START ))
  LM_SECONDS=$(( BUDGET - ELAPSED - RESERVE_B ))
  if [ "$LM_SECONDS" -gt "$LM_MAX" ]; then LM_SECONDS=$LM_MAX; fi
  if [ "$LM_SECONDS" -lt 30 ]; then LM_SECONDS=30; fi
  echo "[stage B] LM gets ${LM_SECONDS}s (elapsed ${ELAPSED}s)"
  $PY training/lm.py --run "$RUN" --seconds "$LM_SECONDS" ${LM_ARGS:-}
  echo "[stage B] LM done at $(( $(date +%s) - START ))s"
  $PY training/export.py --run "$RUN" --out "$RUN/export"
  du -sh "$RUN/export/weights" "$RUN/export/tokenizer"
  echo "[stage B] done in $(( $(date +%s) - START ))s"
} 2>&1 | tee "$LOG"
