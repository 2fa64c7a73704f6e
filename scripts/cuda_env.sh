# Sourced by the GPU scripts: puts the CUDA 13 libraries of the machine's torch installation
# (pip's nvidia-* wheels) on LD_LIBRARY_PATH for a binary built by scripts/build-cuda.sh.
libdirs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for pat in ("libcublas.so.13*", "libcublasLt.so.13*", "libcurand.so.10*", "libnvrtc.so.13*", "libcudart.so.13*"):
        for f in glob.glob(os.path.join(sp, "nvidia", "**", pat), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libdirs:${LD_LIBRARY_PATH:-}"
