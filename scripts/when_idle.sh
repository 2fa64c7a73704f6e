#!/usr/bin/env bash
# Run a benchmark command when the machine is idle, and say how busy the other processes
# kept the CPUs while it ran (a shared CI-like machine: other jobs skew timings).
#
#   scripts/when_idle.sh [--max-wait SECONDS] [--busy PERCENT] -- COMMAND ARGS...
#
# Waits (up to --max-wait, default 900 s) until all CPUs together are at most --busy percent
# busy (default 15) over 3 s, runs the command, then prints on stderr the wall time, the
# command's own CPU seconds (children included) and the CPU seconds everything else used
# meanwhile, as a share of the machine's capacity.
set -euo pipefail

max_wait=900
busy_limit=15
while [[ $# -gt 0 ]]; do
    case "$1" in
        --max-wait) max_wait=$2; shift 2 ;;
        --busy) busy_limit=$2; shift 2 ;;
        --) shift; break ;;
        *) break ;;
    esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [--max-wait S] [--busy PCT] -- COMMAND..." >&2; exit 2; }

hz=$(getconf CLK_TCK)
ncpu=$(getconf _NPROCESSORS_ONLN)

# total and idle jiffies of all CPUs
cpu_jiffies() {
    read -r _ u n s i w x y z _ < /proc/stat
    echo "$((u + n + s + i + w + x + y + z)) $((i + w))"
}

waited=0
while true; do
    read -r t1 i1 < <(cpu_jiffies)
    sleep 3
    read -r t2 i2 < <(cpu_jiffies)
    busy=$((100 - 100 * (i2 - i1) / (t2 - t1)))
    if (( busy <= busy_limit )); then break; fi
    waited=$((waited + 3))
    if (( waited >= max_wait )); then
        echo "when_idle: still ${busy}% busy after ${waited}s; running anyway" >&2
        break
    fi
done

read -r t1 i1 < <(cpu_jiffies)
start=$(date +%s.%N)
status=0
"$@" || status=$?
end=$(date +%s.%N)
read -r t2 i2 < <(cpu_jiffies)
# CPU time of the finished children of this shell (the command and its descendants); the
# builtin must run in this shell, not in a $(...) subshell.
tmp=$(mktemp)
times > "$tmp"
own=$(tail -1 "$tmp" | awk '{
    split($1, u, /m|s/); split($2, s, /m|s/); print u[1] * 60 + u[2] + s[1] * 60 + s[2] }')
rm -f "$tmp"
awk -v t="$((t2 - t1))" -v i="$((i2 - i1))" -v hz="$hz" -v n="$ncpu" -v own="$own" \
    -v wall="$(echo "$end - $start" | bc)" -v waited="$waited" 'BEGIN {
    busy_s = (t - i) / hz
    others = busy_s - own; if (others < 0) others = 0
    printf "when_idle: waited %ds; wall %.1fs; own CPU %.1fs; other processes %.1f CPU-s = %.0f%% of the %d CPUs\n",
        waited, wall, own, others, 100 * others / (wall * n), n > "/dev/stderr"
}'
exit $status
