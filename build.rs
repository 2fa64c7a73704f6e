//! With the `cuda` feature, compile the fused decode kernels (src/text/decode_kernels.cu) to PTX
//! with nvcc (`$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH) for compute capability
//! `$CUDA_COMPUTE_CAP` (default 80; PTX runs on that and every newer GPU). Without it, nothing.
use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let src = "src/text/decode_kernels.cu";
    println!("cargo::rerun-if-changed={src}");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    let nvcc = env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    // The launch code uses programmatic dependent launch only for kernels built for 9.0+.
    println!("cargo::rustc-env=TESSERA_CUDA_CAP={cap}");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("decode_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["-ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), src, "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {} to build the CUDA kernels: {e}", nvcc.display()));
    assert!(status.success(), "{} failed on {src}", nvcc.display());
}
