#!/usr/bin/env bash
# The two device commands of a training run, chained so the GPU never idles between them:
#
#   bash training/gpu_run.sh a     # stage A in the foreground (its files to $OUT), then starts
#                                  # stage B detached (setsid) writing to RUN/outB
#   bash training/gpu_run.sh b     # waits for that stage B and copies RUN/outB to $OUT; on a
#                                  # cold machine (no RUN) runs stage B itself, rebuilding the
#                                  # data from training/runs/stage_a/ (stage A's $OUT files)
#
# The second command must start while the machine is still warm for the chaining to pay.
set -euo pipefail
RUN=${RUN:-/tmp/tessera-run}
case "${1:?usage: gpu_run.sh a|b}" in
  a)
    bash training/stage_a.sh "$RUN" "$OUT"
    mkdir -p "$RUN/outB"
    setsid nohup bash -c "bash training/stage_b.sh '$RUN' '$RUN/outB' > '$RUN/outB.console' 2>&1; touch '$RUN/outB.done'" \
      > /dev/null 2>&1 < /dev/null &
    echo "[gpu_run] stage B started in the background"
    ;;
  b)
    if [ -d "$RUN/outB" ]; then
      echo "[gpu_run] waiting for the background stage B"
      for _ in $(seq 1 580); do
        [ -f "$RUN/outB.done" ] && break
        sleep 1
      done
      tail -n 40 "$RUN/outB.console" || true
      cp "$RUN"/outB/* "$OUT"/ 2>/dev/null || true
      [ -f "$RUN/outB.done" ] || echo "[gpu_run] stage B has not finished"
    else
      echo "[gpu_run] cold machine: running stage B here"
      bash training/stage_b.sh "$RUN" "$OUT"
    fi
    ;;
esac
