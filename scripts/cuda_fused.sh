#!/usr/bin/env bash
# Issue 7: A/B of the CUDA decode paths in one device command with one binary. Variants
# (environment of the same binary):
#   base:   TESSERA_CUDA_FUSED=0 TESSERA_CUDA_EVENTS=1   (run 4's path: candle ops, cuBLAS)
#   events: TESSERA_CUDA_FUSED=0                          (cudarc's event tracking off only)
#   cublas:  TESSERA_CUDA_GEMV_MAX=0 + fused               (the fused kernels, every product by cuBLAS)
#   small:   TESSERA_CUDA_GEMV_MAX=16777216 + unfused      (the GEMV kernel for weights up to 4096^2 only)
#   unfused: TESSERA_CUDA_PROJ_FUSED=0 TESSERA_CUDA_PDL=0 (the GEMV for every product; RoPE and
#            SwiGLU each their own launch)
#   fused:   TESSERA_CUDA_PDL=0 TESSERA_CUDA_NORM_FOLD=0  (+ RoPE and SwiGLU inside the q|k|v and
#            gate|up GEMVs)
#   pdl:     TESSERA_CUDA_NORM_FOLD=0                     (+ programmatic dependent launch: each
#            kernel may start while the previous one finishes)
#   fold:    TESSERA_CUDA_PDL=0                           (fused + each RMSNorm inside the product
#            after it, each residual add inside the output projection: 5 launches per layer)
#   foldpdl: defaults                                     (both)
#   noargmax: TESSERA_CUDA_GUIDED_ARGMAX=0                (foldpdl with guidance and the greedy pick
#            as candle's tensor ops and argmax instead of one kernel)
#   prev:    the binary at .cuda/tessera-cuda-prev.xz (an earlier build, when carried) with
#            TESSERA_CUDA_PDL=1 TESSERA_CUDA_NORM_FOLD=1: kernel changes against the previous build
# A and B name the two variants compared (default A=unfused B=fused); EXTRA more variants whose
# shipped-model greedy codes are checked too.
# Steps, most telling first: KERNELS=1 checks and times the kernels alone
# (scripts/check_decode_kernels.py; KERNEL_ARGS=--no-bench: checks only); the shipped model's greedy codes on B against transformers'
# (f32) and A's (bf16/f16); the Emu3-Gen shape's step time (EMU3=1; the variants of EMU3_ORDER,
# default "A B B A"); NCU=1 profiles a few Emu3-Gen decode steps of A and B with ncu (GPU time per
# kernel against the wall time of a step); the judge on a bench sample with B (LIMIT per
# category, padded batches; LIMIT=0 skips it); N8=1 the shipped model's -n 8 decode time.
# Needs the CUDA build, xz-compressed, at .cuda/tessera-cuda.xz or T_XZ (carried; see cuda_check.sh).
# Two builds too large to carry together compare in two calls on the same warm machine (T_XZ and
# carry set to each in turn; the Emu3-Gen weights and the PTX cache stay between the calls).
# Usage on the device machine: bash scripts/cuda_fused.sh   (results in $OUT/fused.jsonl)
set -u
OUT=${OUT:-/tmp/cuda-fused}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/cuda_fused.log") 2>&1
R="$OUT/fused.jsonl"
T=${T_BIN:-/tmp/tessera-cuda}
DEV=${DEV:-cuda}          # DEV=cpu T_BIN=target/release/tessera EMU3=0 LIMIT=1: a dry run on a CPU machine
LIMIT=${LIMIT:-25}
A=${A:-unfused}
B=${B:-fused}
NEG="lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
[ -n "${T_BIN:-}" ] || { xz -dc "${T_XZ:-.cuda/tessera-cuda.xz}" > "$T" && chmod +x "$T"; }
T_PREV=/tmp/tessera-cuda-prev
[ -f .cuda/tessera-cuda-prev.xz ] && xz -dc .cuda/tessera-cuda-prev.xz > "$T_PREV" && chmod +x "$T_PREV"
[ "$DEV" = cuda ] && . scripts/cuda_env.sh
variant() {  # name -> environment
  case $1 in
    base) echo "TESSERA_CUDA_FUSED=0 TESSERA_CUDA_EVENTS=1" ;;
    events) echo "TESSERA_CUDA_FUSED=0" ;;
    cublas) echo "TESSERA_CUDA_GEMV_MAX=0 TESSERA_CUDA_PDL=0 TESSERA_CUDA_NORM_FOLD=0" ;;
    small) echo "TESSERA_CUDA_GEMV_MAX=16777216 TESSERA_CUDA_PROJ_FUSED=0 TESSERA_CUDA_PDL=0" ;;
    unfused) echo "TESSERA_CUDA_PROJ_FUSED=0 TESSERA_CUDA_PDL=0" ;;
    fused) echo "TESSERA_CUDA_PDL=0 TESSERA_CUDA_NORM_FOLD=0" ;;
    pdl) echo "TESSERA_CUDA_NORM_FOLD=0" ;;
    fold) echo "TESSERA_CUDA_PDL=0" ;;
    foldpdl) echo "TESSERA_CUDA_FUSED=1" ;;
    noargmax) echo "TESSERA_CUDA_GUIDED_ARGMAX=0" ;;
    prev) echo "TESSERA_CUDA_NORM_FOLD=1 TESSERA_CUDA_PDL=1" ;;
  esac
}
binary() { if [ "$1" = prev ]; then echo "$T_PREV"; else echo "$T"; fi; }
gen() {  # variant, then gen arguments; prints the JSON
  env $(variant "$1") timeout 150 "$(binary "$1")" gen "${@:2}" --device $DEV -q --json
}
record() { echo "$1" >> "$R"; echo "RESULT $1"; }

if [ "${KERNELS:-1}" = 1 ] && [ "$DEV" = cuda ]; then
  echo "=== the kernels alone $(date +%T)"
  timeout 240 python3 scripts/check_decode_kernels.py --out "$OUT/kernels.jsonl" ${KERNEL_ARGS:-} || echo "KERNEL CHECK FAILED"
fi

echo "=== warm-up (PTX JIT) $(date +%T)"
for t in "$T" $([ -x "$T_PREV" ] && echo "$T_PREV"); do
  timeout 120 "$t" gen "a cat" --model tests/fixtures/tiny-t4 --device $DEV --size 8x6 -o /tmp/w.png -q --seed 1 > /dev/null
done

echo "=== shipped model: greedy codes $(date +%T)"
# B and the EXTRA variants, each against transformers' f32 codes and against A.
for dt in f32 bf16 f16; do
  for v in $B ${EXTRA:-} $A; do
    gen $v "a red circle" --dtype $dt --size 128x128 --cfg 3 --temperature 0 --seed 1 -o /tmp/s.png > /tmp/s-$v-$dt.json
  done
  python3 - "$dt" "$A" $B ${EXTRA:-} <<'PY' | tee -a "$R"
import json, sys
dt, a, vs = sys.argv[1], sys.argv[2], sys.argv[3:]
ref = [c for row in json.load(open("tests/fixtures/shipped/gen_tokens.json"))["codes"] for c in row]
g = json.load(open(f"/tmp/s-{a}-{dt}.json"))
agree = lambda x, y: sum(p == q for p, q in zip(x, y))
for b in vs:
    f = json.load(open(f"/tmp/s-{b}-{dt}.json"))
    print(json.dumps({"check": "shipped_greedy", "dtype": dt, "variant": b, "against": a,
                      "equals_transformers": f["codes"] == ref, "vs_transformers": agree(f["codes"], ref),
                      "vs_against": agree(f["codes"], g["codes"]), "of": len(ref),
                      "tok_s": f["tokens_per_sec"], "against_tok_s": g["tokens_per_sec"]}))
PY
done

if [ "${EMU3:-1}" = 1 ]; then
  echo "=== Emu3-Gen shape: random bf16 weights $(date +%T)"
  [ -f /tmp/emu3gen/config.json ] || timeout 150 python3 scripts/make_random_model.py --preset emu3-gen --out /tmp/emu3gen --device cuda --seed 0
  python3 scripts/hbm_copy.py | tee -a "$R"  # the floor's bandwidth, in the same run
  for v in ${EMU3_ORDER:-$A $B $B $A}; do
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
  python3 - "$A" "$B" <<'PY' | tee -a "$R"
import json, sys
a, b = sys.argv[1:3]  # the last run of each
c = {v: json.load(open(f"/tmp/e-{v}.json"))["codes"] for v in (a, b)}
print(json.dumps({"check": "emu3gen_agreement", "variant": b, "against": a,
                  "agree": sum(x == y for x, y in zip(c[a], c[b])), "of": len(c[a])}))
PY
  if [ "${NCU:-1}" = 1 ] && command -v ncu > /dev/null; then
    # 16x16 tokens (272 steps); skip the load, the prefill and the first steps, then profile
    # ~3 steps' kernels. ncu times each kernel alone (serialised), so their sum is the GPU's
    # busy time of those steps, to set against the wall time per step measured above.
    for v in $A $B; do
      echo "=== ncu: $v $(date +%T)"
      env $(variant "$v") timeout 280 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        --launch-skip ${NCU_SKIP:-6000} --launch-count ${NCU_COUNT:-1000} \
        "$(binary "$v")" gen "a red cat sits on a mat." --model /tmp/emu3gen --dtype bf16 --size 128x128 --cfg 3 \
        --temperature 0 --seed 1 --device cuda -q -o /tmp/p.png > "$OUT/ncu-$v.csv" 2> /tmp/ncu-$v.err
      tail -n 3 /tmp/ncu-$v.err
      python3 - "$OUT/ncu-$v.csv" "$v" <<'PY' | tee -a "$R"
import csv, io, json, sys, collections
path, v = sys.argv[1:3]
text = open(path).read()
rows = list(csv.DictReader(io.StringIO(text[text.find('"ID"'):])))
by = collections.defaultdict(lambda: [0, 0.0])
total = 0.0
for r in rows:
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    unit = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[r["Metric Unit"]]
    t = float(r["Metric Value"].replace(",", "")) * unit
    name = r["Kernel Name"].split("(")[0][:60]
    by[name][0] += 1
    by[name][1] += t
    total += t
top = sorted(by.items(), key=lambda kv: -kv[1][1])[:14]
print(json.dumps({"check": "ncu", "variant": v, "kernels": sum(c for c, _ in by.values()), "gpu_us": round(total, 1),
                  "top": [[n, c, round(t, 1)] for n, (c, t) in top]}))
PY
    done
  fi
fi
if [ "${N8:-1}" = 1 ]; then
  echo "=== shipped model: -n 8 sampled, decode time $(date +%T)"
  for v in $A $B $A $B; do
    j=$(gen $v "a red star above a blue circle" -n 8 --seed 3 -o /tmp/n8.png | tail -n 1 \
      | python3 -c 'import json,sys; j=json.load(sys.stdin); print(json.dumps({k: j[k] for k in ("decode_secs", "prefill_secs", "total_secs", "tokens_per_sec")}))')
    record "{\"check\": \"shipped_n8\", \"variant\": \"$v\", \"json\": ${j:-null}}"
  done
fi

if [ "$LIMIT" != 0 ]; then
  echo "=== shipped model: judge, $LIMIT per category, $B $(date +%T)"
  j=$(env $(variant "$B") timeout 150 "$(binary "$B")" eval --bench eval/bench.jsonl --model default --device $DEV --limit $LIMIT --batch-size 50 --json -q)
  record "{\"check\": \"shipped_eval\", \"variant\": \"$B\", \"limit\": $LIMIT, \"seed\": 0, \"report\": ${j:-null}}"
fi

echo "done $(date +%T)"
