//! Bandwidth of the decode matrix-vector kernel on weights the size of one decode step.
//!
//!     cargo run --release --example gemv_bw [ROWS]
use std::time::Instant;

fn main() {
    let rows: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    // The default model's per-step matrices (in, out): 10 x (qkv 384->640, o 384->384,
    // gate|up 384->2048, down 1024->384) and the visual head 384->4096.
    let mut shapes = Vec::new();
    for _ in 0..10 {
        shapes.extend([(384, 640), (384, 384), (384, 2048), (1024, 384)]);
    }
    shapes.push((384, 4096));
    let ws: Vec<Vec<f32>> = shapes.iter().map(|&(k, n)| (0..k * n).map(|i| (i % 7) as f32 * 0.01).collect()).collect();
    let bytes: usize = shapes.iter().map(|&(k, n)| k * n * 4).sum();
    let mut times = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        for (w, &(k, n)) in ws.iter().zip(&shapes) {
            let x = vec![0.5f32; rows * k];
            std::hint::black_box(tessera::text::linear::gemv(&x, rows, k, w, n));
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!("rows {rows}: {:.1} MB of weights in {:.2} ms (median of 30) = {:.1} GB/s", bytes as f64 / 1e6, med * 1e3, bytes as f64 / med / 1e9);
}
