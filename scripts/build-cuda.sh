#!/usr/bin/env bash
# Build target/release/tessera with --features cuda on a machine without a GPU or a system CUDA.
#
# The CUDA 13.0 toolkit comes from the vendor's pip wheels; the driver library is replaced at
# link time by a stub generated from cudarc's symbol list (the real libcuda.so.1 is found at run
# time on the GPU machine). The binary then needs, on the machine that runs it: an NVIDIA driver
# supporting CUDA 13.0 (driver >= 580), and libcudart/libcublas/libcublasLt/libcurand/libnvrtc
# of CUDA 13 on LD_LIBRARY_PATH (pip's nvidia-* wheels provide them, e.g. in a torch venv).
# Kernels are compiled for compute capability ${CUDA_COMPUTE_CAP:-90} (H100/H200).
#
#   scripts/build-cuda.sh            # toolkit cached under $CUDA_WHEELS (default ~/.cache/tessera-cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
root="${CUDA_WHEELS:-$HOME/.cache/tessera-cuda}"
C="$root/nvidia/cu13"
if [ ! -x "$C/bin/nvcc" ]; then
  mkdir -p "$root/wh"
  python3 -m pip download -q --no-deps -d "$root/wh" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
  for w in "$root"/wh/*.whl; do unzip -qo "$w" 'nvidia/*' -d "$root"; done
  chmod +x "$C"/bin/* "$C"/nvvm/bin/*
  (cd "$C/lib" && for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done \
     && ln -sf libcurand.so.10 libcurand.so) && ln -sfn lib "$C/lib64"
fi
# The wheels ship no libcuda: link against a stub holding every driver symbol cudarc declares.
cargo fetch -q
sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-*/src/driver/sys/mod.rs | tail -n 1)
mkdir -p "$C/lib/stubs"
grep -oE "pub unsafe fn cu[A-Za-z0-9_]*" "$sys" | awk '{print "void " $4 "(void){}"}' | sort -u > "$root/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$C/lib/stubs/libcuda.so" "$root/stub.c"
export CUDA_HOME="$C" PATH="$C/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
cargo build --release --features cuda "$@"
echo "built target/release/tessera with CUDA (compute capability $CUDA_COMPUTE_CAP)"
