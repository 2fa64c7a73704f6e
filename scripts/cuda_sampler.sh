#!/usr/bin/env bash
# Issue 7: the decode loop's sampler inputs on the host (every row's candidate logits copied
# each step, guidance on the CPU) against on the device (guidance and the greedy argmax as tensor
# ops; only the chosen codes or one guided row per image reach the host). One device command.
#
# Needs the CUDA build of examples/greedy_tokens, xz-compressed, at .cuda/greedy-cuda.xz (carried):
#   CARGO_TARGET_DIR=target-cuda scripts/build-cuda.sh --example greedy_tokens
#   strip -o .cuda/greedy-cuda target-cuda/release/examples/greedy_tokens && xz -T2 .cuda/greedy-cuda
# Usage on the device machine: bash scripts/cuda_sampler.sh   (results in $OUT/sampler.jsonl)
# EMU3=0 skips the Emu3-Gen shape (random bf16 weights, 17.5 GB written on the GPU machine).
set -u
OUT=${OUT:-/tmp/cuda-sampler}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/cuda_sampler.log") 2>&1
R="$OUT/sampler.jsonl"
G=${G_BIN:-/tmp/greedy-cuda}
DEV=${DEV:-cuda}          # DEV=cpu G_BIN=target/release/examples/greedy_tokens EMU3=0: a dry run on a CPU machine
[ -n "${G_BIN:-}" ] || { xz -dc .cuda/greedy-cuda.xz > "$G" && chmod +x "$G"; }
[ "$DEV" = cuda ] && . scripts/cuda_env.sh
NEG="lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."

# The shipped model as one checkpoint directory (greedy_tokens takes config.json + tokenizer.json).
mkdir -p /tmp/shipped && ln -sf "$PWD"/weights/* "$PWD"/tokenizer/tokenizer.json /tmp/shipped/

run() {  # label, then greedy_tokens arguments; one JSON line per run into $R
  local label=$1; shift
  local j
  j=$(timeout 200 "$G" --device $DEV --no-vq "$@" 2>/tmp/g.err) || { echo "$label failed"; tail -3 /tmp/g.err; return; }
  python3 - "$label" "$j" <<'PY' | tee -a "$R"
import json, sys
label, j = sys.argv[1], json.loads(sys.argv[2])
h, w = j["grid"]
steps = [r["steps"] for r in j["runs"]]
dec = [r["decode_s"] for r in j["runs"]][1:] or [j["runs"][0]["decode_s"]]   # the first run warms up
dec.sort()
med = dec[len(dec) // 2]
print(json.dumps({"check": "sampler", "label": label, "sampler": j["sampler"], "dtype": j["dtype"], "grid": [h, w],
                  "temperature": j["temperature"], "count": j["count"], "decode_s_median": med, "decode_s": dec,
                  "ms_per_step": 1e3 * med / steps[0], "codes_head": j["image_codes"][0][:8]}))
PY
}

echo "=== warm-up (PTX JIT) $(date +%T)"
timeout 120 "$G" --device $DEV --no-vq --model tests/fixtures/tiny-t4 --grid 8x6 > /dev/null

echo "=== shipped model, f32 $(date +%T)"
for s in host device host device; do
  run "shipped greedy" --model /tmp/shipped --grid 16x16 --cfg 3 --sampler $s --repeats 4
  run "shipped sampled x8" --model /tmp/shipped --grid 16x16 --cfg 3 --temperature 1 --top-k 64 -n 8 --sampler $s --repeats 3
done

if [ "${EMU3:-1}" = 1 ]; then
  echo "=== Emu3-Gen shape, bf16 $(date +%T)"
  [ -f /tmp/emu3gen/config.json ] || timeout 150 python3 scripts/make_random_model.py --preset emu3-gen --out /tmp/emu3gen --device cuda --seed 0
  for s in host device; do
    run "emu3-gen greedy 32x32" --model /tmp/emu3gen --grid 32x32 --cfg 3 --negative "$NEG" --dtype bf16 --sampler $s --repeats 2
  done
fi
echo "done $(date +%T)"
