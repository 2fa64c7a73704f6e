#!/usr/bin/env bash
# Issue 7's GPU checks in one device command (see BENCHMARKS.md, "CUDA"):
#   1. HBM copy bandwidth (torch), for the decode floor
#   2. parity fixtures: greedy CFG codes on CUDA (f32) == transformers' reference == CPU; bf16 agreement
#   3. the shipped model: greedy codes on CUDA vs transformers' reference, and the judge on a bench sample
#   4. Emu3-Gen shape (random bf16 weights written here): Tessera vs transformers generate, tokens/s,
#      peak GPU memory, tokens agreement
# Needs the CUDA build, xz-compressed, at .cuda/tessera-cuda.xz (carried: it is ignored by git):
#   scripts/build-cuda.sh && mkdir -p .cuda && strip -o .cuda/tessera-cuda target/release/tessera && xz -T2 .cuda/tessera-cuda
# Usage on the device machine: bash scripts/cuda_check.sh   (writes to $OUT)
set -u
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/cuda_check.log") 2>&1
R="$OUT/results.jsonl"
T=${T_BIN:-/tmp/tessera-cuda}
DEV=${DEV:-cuda}         # DEV=cpu T_BIN=target/release/tessera EMU3=0 LIMIT=2: a dry run of the script on a CPU machine
LIMIT=${LIMIT:-50}
NEG="lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
step() { echo; echo "=== $* ($(date +%T))"; }
record() { echo "$1" >> "$R"; echo "RESULT $1"; }

step setup
[ -n "${T_BIN:-}" ] || { xz -dc .cuda/tessera-cuda.xz > "$T" && chmod +x "$T"; }
. scripts/cuda_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
ldd "$T" | grep -E "cuda|cublas|curand|nvrtc" || true

[ "$DEV" = cuda ] && step "HBM copy bandwidth" && python3 scripts/hbm_copy.py | tee -a "$R"

step "warm-up (PTX JIT) on a fixture"
t0=$(date +%s%N)
timeout 120 "$T" gen "a cat" --model tests/fixtures/tiny-t4 --device $DEV --size 8x6 -o /tmp/w.png -q --seed 1
record "{\"check\": \"jit_warmup\", \"rc\": $?, \"ms\": $(( ($(date +%s%N) - t0) / 1000000 ))}"

step "parity fixtures: greedy CFG on CUDA vs CPU vs transformers"
for fx in tiny-t4:8x6 tiny-t1:3x4; do
  name=${fx%%:*}; size=${fx##*:}; dir=tests/fixtures/$name
  cap=$(python3 -c "import json;print(json.load(open('$dir/reference.json'))['generation']['caption'])")
  for dev in cpu $DEV; do
    for dt in f32 bf16; do
      [ "$dev" = cpu ] && [ "$dt" = bf16 ] && continue
      j=$(timeout 60 "$T" gen "$cap" --negative "$NEG" --model "$dir" --device $dev --dtype $dt --size $size --cfg 3 --temperature 0 --seed 1 -q --json -o /tmp/p.png)
      python3 - "$dir" "$dev" "$dt" "$j" <<'PY' | tee -a "$R"
import json, sys
d, dev, dt, j = sys.argv[1:5]
ref = [c for row in json.load(open(d + "/reference.json"))["generation"]["image_codes"] for c in row]
got = json.loads(j)["codes"] if j.strip() else []
same = sum(a == b for a, b in zip(ref, got))
print(json.dumps({"check": "fixture_greedy", "fixture": d.split("/")[-1], "device": dev, "dtype": dt,
                  "codes_equal_reference": got == ref, "agree": same, "of": len(ref)}))
PY
    done
  done
  # VQ encode of an image on both devices.
  [ -f /tmp/enc/samples.jsonl ] || "$T" world sample --count 1 --seed 3 --size 64x64 --out /tmp/enc
  a=$(timeout 60 "$T" tokenize /tmp/enc/*.png --model "$dir" --device cpu 2>/dev/null)
  b=$(timeout 60 "$T" tokenize /tmp/enc/*.png --model "$dir" --device $DEV 2>/dev/null)
  record "{\"check\": \"fixture_vq_encode\", \"fixture\": \"$name\", \"cuda_equals_cpu\": $([ -n "$a" ] && [ "$a" = "$b" ] && echo true || echo false)}"
done

step "shipped model: greedy t2i codes on CUDA vs transformers"
j=$(timeout 60 "$T" gen "a red circle" --device $DEV --size 128x128 --cfg 3 --temperature 0 --seed 1 -q --json -o /tmp/s.png)
python3 - "$j" <<'PY' | tee -a "$R"
import json, sys
ref = [c for row in json.load(open("tests/fixtures/shipped/gen_tokens.json"))["codes"] for c in row]
j = json.loads(sys.argv[1]) if sys.argv[1].strip() else {}
got = j.get("codes", [])
print(json.dumps({"check": "shipped_greedy", "device": "cuda", "codes_equal_transformers": got == ref,
                  "agree": sum(a == b for a, b in zip(ref, got)), "of": len(ref), "tokens_per_sec": j.get("tokens_per_sec")}))
PY

if [ "${EMU3:-1}" = 1 ]; then
step "Emu3-Gen shape: random bf16 weights"
t0=$(date +%s%N)
timeout 150 python3 scripts/make_random_model.py --preset emu3-gen --out /tmp/emu3gen --device cuda --seed 0
record "{\"check\": \"emu3gen_weights\", \"rc\": $?, \"ms\": $(( ($(date +%s%N) - t0) / 1000000 ))}"
du -sh /tmp/emu3gen

peak() {  # peak GPU memory (MiB) while "$@" runs
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/mem.log &
  local mp=$!
  "$@"
  local rc=$?
  kill $mp 2>/dev/null; wait $mp 2>/dev/null
  echo "PEAK_MIB $(sort -n /tmp/mem.log | tail -1)" >&2
  return $rc
}

step "Emu3-Gen shape: Tessera, 32x32 tokens, CFG 3, greedy, bf16"
peak timeout 150 "$T" gen "a red cat sits on a mat." --negative "$NEG" --model /tmp/emu3gen --device cuda --dtype bf16 \
  --size 256x256 --cfg 3 --temperature 0 --seed 1 -q --json -o /tmp/e.png > /tmp/tess.json 2>/tmp/tess.err
echo "tessera rc=$?"; tail -2 /tmp/tess.err; grep PEAK_MIB /tmp/tess.err || true
record "{\"check\": \"emu3gen_tessera\", \"json\": $(head -c 100000 /tmp/tess.json | python3 -c 'import json,sys; t=sys.stdin.read().strip(); print(t if t else "null")')}"

if [ "${HF:-1}" = 1 ]; then
step "Emu3-Gen shape: transformers generate, same prompts and processors, bf16"
peak timeout 200 python3 scripts/torch_reference.py --model /tmp/emu3gen --prompt "a red cat sits on a mat." --grid 32x32 \
  --cfg 3 --dtype bfloat16 --device cuda > /tmp/hf.json 2>/tmp/hf.err
echo "transformers rc=$?"; tail -3 /tmp/hf.err; grep PEAK_MIB /tmp/hf.err || true
record "{\"check\": \"emu3gen_transformers\", \"json\": $(python3 -c 'import json,sys; t=open("/tmp/hf.json").read().strip().splitlines(); print(t[-1] if t else "null")')}"
fi
python3 - <<'PY' | tee -a "$R"
import json
try:
    t = json.load(open("/tmp/tess.json")); h = json.loads(open("/tmp/hf.json").read().strip().splitlines()[-1])
    hc = [c for row in h["image_codes"] for c in row]
    print(json.dumps({"check": "emu3gen_agreement", "agree": sum(a == b for a, b in zip(t["codes"], hc)), "of": len(hc),
                      "tessera_tok_s": t["tokens_per_sec"], "transformers_tok_s": h["tokens_per_s"]}))
except Exception as e:
    print(json.dumps({"check": "emu3gen_agreement", "error": str(e)}))
PY
fi
step "shipped model: judge on the bench ($LIMIT per category)"
t0=$(date +%s%N)
j=$(timeout ${EVAL_SECS:-150} "$T" eval --bench eval/bench.jsonl --model default --device $DEV --limit $LIMIT --batch-size 50 --json -q)
record "{\"check\": \"shipped_eval\", \"device\": \"$DEV\", \"limit\": $LIMIT, \"seed\": 0, \"report\": ${j:-null}, \"ms\": $(( ($(date +%s%N) - t0) / 1000000 ))}"

echo; echo "done $(date +%T)"
