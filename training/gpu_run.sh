#!/usr/bin/env bash
# The device commands of a training run, chained so the GPU never idles between them:
#
#   bash training/gpu_run.sh a     # stage A in the foreground (its files to $OUT), then starts
#                                  # stage B detached (setsid) writing to RUN/outB
#   bash training/gpu_run.sh cold  # no stage A: starts stage B detached, rebuilding the data and
#                                  # codes from FROM (default training/runs/stage_a: a stage A's
#                                  # $OUT files, carried), then waits for it as `b` does
#   bash training/gpu_run.sh b     # waits (at most WAIT seconds, default 570) for that stage B;
#                                  # copies RUN/outB to $OUT once it has finished, else prints its
#                                  # progress: call it again (while the machine is warm) to go on
#                                  # waiting. On a cold machine (no RUN) it runs stage B itself,
#                                  # rebuilding the data from training/runs/stage_a/.
#   bash training/gpu_run.sh last  # after `b` brought the export back: the last weights of an
#                                  # --ema run (RUN/last/lm_last.tar.part-*) to $OUT; a separate
#                                  # call, since $OUT brings back 64 MiB at most per call
#
# Stage B's budget can exceed one command: BUDGET_B (seconds, default 540) and LM_MAX_B are handed
# to the detached stage B as BUDGET and LM_MAX, so one LM schedule spans several `b` calls.
# The generator binary: WORLD, or .carry/tessera.xz (a stripped, xz-compressed release build,
# carried with `carry: [".carry"]`, since the shipped weights leave no room for a plain one).
# Everything else (WARM, DATA_ARGS, VQ_ARGS, LM_ARGS, ...) passes through to the stage scripts.
set -euo pipefail
RUN=${RUN:-/tmp/tessera-run}
if [ -z "${WORLD:-}" ] && [ -f .carry/tessera.xz ]; then
  mkdir -p /tmp/tessera-bin
  xz -dc .carry/tessera.xz > /tmp/tessera-bin/tessera
  chmod +x /tmp/tessera-bin/tessera
  export WORLD=/tmp/tessera-bin/tessera
fi
start_b() {  # stage B, detached, writing to RUN/outB
  mkdir -p "$RUN/outB"
  BUDGET=${BUDGET_B:-540} LM_MAX=${LM_MAX_B:-450} setsid nohup bash -c \
    "bash training/stage_b.sh '$RUN' '$RUN/outB' > '$RUN/outB.console' 2>&1; touch '$RUN/outB.done'" \
    > /dev/null 2>&1 < /dev/null &
  echo "[gpu_run] stage B started in the background (budget ${BUDGET_B:-540}s)"
}
wait_b() {  # at most WAIT seconds; RUN/outB to $OUT once stage B has finished
  echo "[gpu_run] waiting for the background stage B"
  for _ in $(seq 1 "${WAIT:-570}"); do
    [ -f "$RUN/outB.done" ] && break
    sleep 1
  done
  if [ -f "$RUN/outB.done" ]; then
    tail -n 40 "$RUN/outB.console" || true
    cp "$RUN"/outB/* "$OUT"/ 2>/dev/null || true
  else
    tail -n 8 "$RUN/outB.console" || true
    echo "[gpu_run] stage B has not finished: call 'b' again"
  fi
}
case "${1:?usage: gpu_run.sh a|cold|b|last}" in
  a)
    bash training/stage_a.sh "$RUN" "$OUT"
    start_b
    ;;
  cold)
    [ ! -d "$RUN/outB" ] || { echo "[gpu_run] RUN/outB exists: a stage B already ran here; call 'b'"; exit 1; }
    start_b
    wait_b
    ;;
  b)
    if [ -d "$RUN/outB" ]; then
      wait_b
    else
      echo "[gpu_run] cold machine: running stage B here"
      bash training/stage_b.sh "$RUN" "$OUT"
    fi
    ;;
  last)
    ls "$RUN"/last/lm_last.tar.part-* > /dev/null 2>&1 || { echo "[gpu_run] no RUN/last/lm_last.tar.part-* (not an --ema run, or stage B has not finished)"; exit 1; }
    cp "$RUN"/last/lm_last.tar.part-* "$OUT"/
    ls -la "$OUT"
    ;;
esac
