#!/usr/bin/env bash
# Issue 7: the fused CUDA decode step (src/text/cuda_decode.rs) and cudarc's event tracking off
# (src/device.rs), against the previous path, in one device command with one binary:
#   base:   TESSERA_CUDA_FUSED=0 TESSERA_CUDA_EVENTS=1   (what run 4 measured)
#   events: TESSERA_CUDA_FUSED=0                          (event tracking off only)
#   fused:  defaults                                      (both)
# Checks: the shipped model's greedy codes on the fused path equal transformers' (f32); bf16/f16
# codes fused vs base; the judge on a bench sample (padded batches); Emu3-Gen shape step time.
# Needs the CUDA build, xz-compressed, at .cuda/tessera-cuda.xz (carried; see cuda_check.sh).
# Usage on the device machine: bash scripts/cuda_fused.sh   (results in $OUT/fused.jsonl)
set -u
OUT=${OUT:-/tmp/cuda-fused}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/cuda_fused.log") 2>&1
R="$OUT/fused.jsonl"
T=${T_BIN:-/tmp/tessera-cuda}
DEV=${DEV:-cuda}          # DEV=cpu T_BIN=target/release/tessera EMU3=0 LIMIT=1: a dry run on a CPU machine
LIMIT=${LIMIT:-25}
NEG="lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
[ -n "${T_BIN:-}" ] || { xz -dc .cuda/tessera-cuda.xz > "$T" && chmod +x "$T"; }
[ "$DEV" = cuda ] && . scripts/cuda_env.sh
variant() {  # name -> environment
  case $1 in
    base) echo "TESSERA_CUDA_FUSED=0 TESSERA_CUDA_EVENTS=1" ;;
    events) echo "TESSERA_CUDA_FUSED=0" ;;
    fused) echo "TESSERA_CUDA_FUSED=1" ;;
  esac
}
gen() {  # variant, then gen arguments; prints the JSON
  env $(variant "$1") timeout 150 "$T" gen "${@:2}" --device $DEV -q --json
}
record() { echo "$1" >> "$R"; echo "RESULT $1"; }

echo "=== warm-up (PTX JIT) $(date +%T)"
timeout 120 "$T" gen "a cat" --model tests/fixtures/tiny-t4 --device $DEV --size 8x6 -o /tmp/w.png -q --seed 1 > /dev/null

echo "=== shipped model: greedy codes $(date +%T)"
for dt in f32 bf16 f16; do
  for v in fused base; do
    gen $v "a red circle" --dtype $dt --size 128x128 --cfg 3 --temperature 0 --seed 1 -o /tmp/s.png > /tmp/s-$v-$dt.json
  done
  python3 - "$dt" <<'PY' | tee -a "$R"
import json, sys
dt = sys.argv[1]
ref = [c for row in json.load(open("tests/fixtures/shipped/gen_tokens.json"))["codes"] for c in row]
f, b = (json.load(open(f"/tmp/s-{v}-{dt}.json")) for v in ("fused", "base"))
agree = lambda x, y: sum(p == q for p, q in zip(x, y))
print(json.dumps({"check": "shipped_greedy", "dtype": dt, "fused_equals_transformers": f["codes"] == ref,
                  "fused_vs_transformers": agree(f["codes"], ref), "fused_vs_base": agree(f["codes"], b["codes"]),
                  "of": len(ref), "fused_tok_s": f["tokens_per_sec"], "base_tok_s": b["tokens_per_sec"]}))
PY
done

echo "=== shipped model: -n 8 sampled, decode time $(date +%T)"
for v in base fused base fused; do
  j=$(gen $v "a red star above a blue circle" -n 8 --seed 3 -o /tmp/n8.png | tail -n 1 \
    | python3 -c 'import json,sys; j=json.load(sys.stdin); print(json.dumps({k: j[k] for k in ("decode_secs", "prefill_secs", "total_secs", "tokens_per_sec")}))')
  record "{\"check\": \"shipped_n8\", \"variant\": \"$v\", \"json\": ${j:-null}}"
done

echo "=== shipped model: judge, $LIMIT per category, fused $(date +%T)"
j=$(timeout 150 "$T" eval --bench eval/bench.jsonl --model default --device $DEV --limit $LIMIT --batch-size 50 --json -q)
record "{\"check\": \"shipped_eval\", \"variant\": \"fused\", \"limit\": $LIMIT, \"seed\": 0, \"report\": ${j:-null}}"

if [ "${EMU3:-1}" = 1 ]; then
  echo "=== Emu3-Gen shape: random bf16 weights $(date +%T)"
  [ -f /tmp/emu3gen/config.json ] || timeout 150 python3 scripts/make_random_model.py --preset emu3-gen --out /tmp/emu3gen --device cuda --seed 0
  for v in base events fused fused events base; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/mem.log &
    mp=$!
    gen $v "a red cat sits on a mat." --negative "$NEG" --model /tmp/emu3gen --dtype bf16 --size 256x256 --cfg 3 \
      --temperature 0 --seed 1 -o /tmp/e.png > /tmp/e-$v.json
    kill $mp 2>/dev/null; wait $mp 2>/dev/null
    python3 - "$v" "$(sort -n /tmp/mem.log | tail -1)" <<'PY' | tee -a "$R"
import json, sys
v, peak = sys.argv[1], sys.argv[2]
j = json.load(open(f"/tmp/e-{v}.json"))
print(json.dumps({"check": "emu3gen", "variant": v, "decode_s": j["decode_secs"], "prefill_s": j["prefill_secs"],
                  "load_s": j["load_secs"], "tokens_per_sec": j["tokens_per_sec"], "peak_mib": peak,
                  "codes_head": j["codes"][:8]}))
PY
  done
  python3 - <<'PY' | tee -a "$R"
import json
c = {v: json.load(open(f"/tmp/e-{v}.json"))["codes"] for v in ("base", "events", "fused")}
print(json.dumps({"check": "emu3gen_agreement", "fused_vs_base": sum(a == b for a, b in zip(c["fused"], c["base"])),
                  "events_vs_base": sum(a == b for a, b in zip(c["events"], c["base"])), "of": len(c["base"])}))
PY
fi
echo "done $(date +%T)"
