//! Bandwidth of the decode kernel (`text::linear::Panels`) on the weights of one decode step of the default
//! model, with f16 and f32 panels (the weights are exact in f16), against candle's matmul on the
//! same products (weights as stored, `(out, in)`, and pre-transposed, `(in, out)`), measured
//! side by side. GB/s counts the bytes each layout reads.
//!
//!     cargo run --release --example gemv_bw [ROWS]
use std::time::Instant;

use candle_core::{Device, Tensor};
use tessera::text::linear::Panels;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let rows: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    // The default model's per-step matrices (in, out): 10 x (qkv 384->640, o 384->384,
    // gate|up 384->2048, down 1024->384) and the visual head 384->4096.
    let mut shapes = Vec::new();
    for _ in 0..10 {
        shapes.extend([(384, 640), (384, 384), (384, 2048), (1024, 384)]);
    }
    shapes.push((384, 4096));
    let dev = Device::Cpu;
    let ws: Vec<Vec<f32>> = shapes.iter().map(|&(k, n)| (0..k * n).map(|i| (i % 7) as f32 * 0.0625).collect()).collect();
    let wt: Vec<Tensor> = ws.iter().zip(&shapes).map(|(w, &(k, n))| Tensor::from_slice(w, (n, k), &dev)).collect::<Result<_, _>>()?;
    let wtt: Vec<Tensor> = wt.iter().map(|w| w.t()?.contiguous()).collect::<Result<_, _>>()?;
    let xs: Vec<Tensor> = shapes.iter().map(|&(k, _)| Tensor::ones((rows, k), candle_core::DType::F32, &dev)).collect::<Result<_, _>>()?;
    let bytes: usize = shapes.iter().map(|&(k, n)| k * n * 4).sum();
    let pack = |f: fn(&[f32], usize, usize) -> Panels| -> Vec<Panels> { ws.iter().zip(&shapes).map(|(w, &(k, n))| f(w, n, k)).collect() };
    let (half, full) = (pack(Panels::pack), pack(Panels::pack_f32));
    let run_panels = |panels: &[Panels]| {
        let t = Instant::now();
        for (p, &(k, _)) in panels.iter().zip(&shapes) {
            let x = vec![0.5f32; rows * k];
            std::hint::black_box(p.matmul(&x, rows));
        }
        t.elapsed().as_secs_f64()
    };
    let (mut ours16, mut ours32, mut candle_t, mut candle_pre) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..20 {
        ours16.push(run_panels(&half));
        ours32.push(run_panels(&full));
        let t = Instant::now();
        for (x, w) in xs.iter().zip(&wt) {
            std::hint::black_box(x.matmul(&w.t()?)?);
        }
        candle_t.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for (x, w) in xs.iter().zip(&wtt) {
            std::hint::black_box(x.matmul(w)?);
        }
        candle_pre.push(t.elapsed().as_secs_f64());
    }
    let name16 = format!("packed-panel kernel, {:?}", half[0].dtype());
    for (name, v, b) in [
        (name16.as_str(), ours16, bytes / 2),
        ("packed-panel kernel, F32", ours32, bytes),
        ("candle x.matmul(W^T)", candle_t, bytes),
        ("candle, W pre-transposed", candle_pre, bytes),
    ] {
        let m = median(v);
        println!("rows {rows:>2} {name:<29} {:.2} ms (median of 20) = {:.1} GB/s of weights", m * 1e3, b as f64 / m / 1e9);
    }
    Ok(())
}
