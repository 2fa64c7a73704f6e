//! Where one decode step spends its time, op by op, without touching the engine: a replica
//! of `src/text`'s forward for one token at batch 2 (same candle calls, same shapes, random
//! weights of the default model's shape), with a timer around every op. Then the same
//! linear layers in other layouts (pre-transposed weights, Q8_0 `QMatMul`, one row at a
//! time) to estimate what each change would gain.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench --bench step_profile [-- KV_LEN]
//! ```
//!
//! The shape is the `default` preset of scripts/make_random_model.py (hidden 384, 10 layers,
//! 6/2 heads of 64, intermediate 1024, 4096 visual tokens). KV_LEN (default 150, the middle
//! of a 16x16 image) is the number of cached positions; one of the two rows is left-padded,
//! as in a CFG batch whose prompts differ in length, so the step has an attention mask.
//! Medians over 40 steps after 5 warm-up steps.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::kv_cache::KvCache;

const D_MODEL: usize = 384;
const LAYERS: usize = 10;
const HEADS: usize = 6;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const INTER: usize = 1024;
const CODES: usize = 4096;
const B: usize = 2;

struct Layer {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    ln1: Tensor,
    ln2: Tensor,
}

fn randn(shape: (usize, usize), dev: &Device) -> Tensor {
    Tensor::randn(0f32, 0.02, shape, dev).unwrap()
}

/// Accumulates seconds per op name over a step.
#[derive(Default)]
struct Timer {
    acc: BTreeMap<&'static str, f64>,
}

impl Timer {
    fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        *self.acc.entry(name).or_default() += t.elapsed().as_secs_f64();
        out
    }
}

fn linear(x: &Tensor, w: &Tensor) -> Tensor {
    // candle_nn::Linear::forward for a contiguous (b, t, in) input.
    let (b, t, i) = x.dims3().unwrap();
    x.reshape((b * t, i)).unwrap().matmul(&w.t().unwrap()).unwrap().reshape((b, t, ())).unwrap()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn main() {
    let kv_len: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(150);
    let dev = Device::Cpu;
    let layers: Vec<Layer> = (0..LAYERS)
        .map(|_| Layer {
            q: randn((HEADS * HEAD_DIM, D_MODEL), &dev),
            k: randn((KV_HEADS * HEAD_DIM, D_MODEL), &dev),
            v: randn((KV_HEADS * HEAD_DIM, D_MODEL), &dev),
            o: randn((D_MODEL, HEADS * HEAD_DIM), &dev),
            gate: randn((INTER, D_MODEL), &dev),
            up: randn((INTER, D_MODEL), &dev),
            down: randn((D_MODEL, INTER), &dev),
            ln1: Tensor::ones(D_MODEL, DType::F32, &dev).unwrap(),
            ln2: Tensor::ones(D_MODEL, DType::F32, &dev).unwrap(),
        })
        .collect();
    let head = randn((CODES, D_MODEL), &dev);
    let norm = Tensor::ones(D_MODEL, DType::F32, &dev).unwrap();
    let max_len = kv_len + 64;
    let half = HEAD_DIM / 2;
    let cos = Tensor::ones((max_len, half), DType::F32, &dev).unwrap();
    let sin = Tensor::zeros((max_len, half), DType::F32, &dev).unwrap();
    let pad = [0usize, 18];

    // Caches filled up to kv_len.
    let mut caches: Vec<KvCache> = (0..LAYERS).map(|_| KvCache::new(2, max_len)).collect();
    for c in caches.iter_mut() {
        let k = Tensor::randn(0f32, 1.0, (B, KV_HEADS, kv_len, HEAD_DIM), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (B, KV_HEADS, kv_len, HEAD_DIM), &dev).unwrap();
        c.append(&k, &v).unwrap();
    }
    let x0 = Tensor::randn(0f32, 1.0, (B, 1, D_MODEL), &dev).unwrap();
    let threads = candle_core::utils::get_num_threads();

    // ---- The replica, timed op by op. ----
    let mut per_op: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut totals = Vec::new();
    for step in 0..45 {
        let mut tm = Timer::default();
        let t_step = Instant::now();
        let mut cs = caches.clone(); // shares storage; each step writes slot kv_len again
        let len = kv_len;
        // Cache::positions / Cache::mask / RotaryEmbedding::at
        let (cos_t, sin_t, mask) = tm.time("positions, mask, rope tables", || {
            let pos: Vec<u32> = pad.iter().map(|&p| (len as u32).saturating_sub(p as u32)).collect();
            let pos = Tensor::from_vec(pos, (B, 1), &dev).unwrap();
            let flat = pos.flatten_all().unwrap();
            let c = cos.index_select(&flat, 0).unwrap().reshape((B, 1, half)).unwrap();
            let s = sin.index_select(&flat, 0).unwrap().reshape((B, 1, half)).unwrap();
            let kv = len + 1;
            let mut m = Vec::with_capacity(B * kv);
            for &p in &pad {
                m.extend((0..kv).map(|j| if j >= p { 0f32 } else { f32::NEG_INFINITY }));
            }
            let m = Tensor::from_vec(m, (B, 1, 1, kv), &dev).unwrap().to_dtype(DType::F32).unwrap();
            (c, s, m)
        });
        let mut x = x0.clone();
        for (l, cache) in layers.iter().zip(cs.iter_mut()) {
            let h = tm.time("rms_norm", || candle_nn::ops::rms_norm(&x, &l.ln1, 1e-5).unwrap());
            let (q, k, v) = tm.time("matmul q/k/v proj", || (linear(&h, &l.q), linear(&h, &l.k), linear(&h, &l.v)));
            let (q, k, v) = tm.time("reshape/transpose/contiguous", || {
                (
                    q.reshape((B, 1, HEADS, HEAD_DIM)).unwrap().transpose(1, 2).unwrap(),
                    k.reshape((B, 1, KV_HEADS, HEAD_DIM)).unwrap().transpose(1, 2).unwrap(),
                    v.reshape((B, 1, KV_HEADS, HEAD_DIM)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap(),
                )
            });
            let (q, k) = tm.time("rope", || {
                (
                    candle_nn::rotary_emb::rope(&q.contiguous().unwrap(), &cos_t, &sin_t).unwrap(),
                    candle_nn::rotary_emb::rope(&k.contiguous().unwrap(), &cos_t, &sin_t).unwrap(),
                )
            });
            let (k, v) = tm.time("kv cache append", || cache.append(&k, &v).unwrap());
            let kvl = k.dim(2).unwrap();
            let n_rep = HEADS / KV_HEADS;
            let att = tm.time("attention q.k^T", || {
                let q = q.reshape((B, KV_HEADS, n_rep, HEAD_DIM)).unwrap();
                (q.matmul(&k.t().unwrap()).unwrap() * (HEAD_DIM as f64).powf(-0.5)).unwrap()
            });
            let att = tm.time("attention mask add", || {
                att.reshape((B, KV_HEADS, n_rep, 1, kvl))
                    .unwrap()
                    .broadcast_add(&mask.unsqueeze(2).unwrap())
                    .unwrap()
                    .reshape((B, KV_HEADS, n_rep, kvl))
                    .unwrap()
            });
            let att = tm.time("softmax", || {
                candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32).unwrap()).unwrap().to_dtype(DType::F32).unwrap()
            });
            let y = tm.time("attention att.v", || att.matmul(&v).unwrap());
            let y = tm.time("reshape/transpose/contiguous", || {
                y.reshape((B, HEADS, 1, HEAD_DIM)).unwrap().transpose(1, 2).unwrap().reshape((B, 1, HEADS * HEAD_DIM)).unwrap()
            });
            let h = tm.time("matmul o proj", || linear(&y, &l.o));
            x = tm.time("residual add", || (&x + h).unwrap());
            let h = tm.time("rms_norm", || candle_nn::ops::rms_norm(&x, &l.ln2, 1e-5).unwrap());
            let (g, u) = tm.time("matmul gate/up proj", || (linear(&h, &l.gate), linear(&h, &l.up)));
            let gu = tm.time("silu * up", || g.silu().unwrap().mul(&u).unwrap());
            let h = tm.time("matmul down proj", || linear(&gu, &l.down));
            x = tm.time("residual add", || (&x + h).unwrap());
        }
        let x = tm.time("rms_norm", || candle_nn::ops::rms_norm(&x, &norm, 1e-5).unwrap());
        let logits = tm.time("matmul lm_head (visual rows)", || {
            x.squeeze(1).unwrap().matmul(&head.t().unwrap()).unwrap().to_vec2::<f32>().unwrap()
        });
        std::hint::black_box(logits);
        let total = t_step.elapsed().as_secs_f64();
        if step >= 5 {
            totals.push(total);
            for (k, v) in tm.acc {
                per_op.entry(k).or_default().push(v);
            }
        }
    }
    let step_med = median(totals);
    println!("decode step replica, batch {B}, kv_len {kv_len}, threads {threads}: median {:.3} ms", step_med * 1e3);
    let mut rows: Vec<(&str, f64)> = per_op.into_iter().map(|(k, v)| (k, median(v))).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let listed: f64 = rows.iter().map(|r| r.1).sum();
    for (k, v) in &rows {
        println!("  {k:<32} {:>8.3} ms  {:>5.1}%", v * 1e3, 100.0 * v / step_med);
    }
    println!("  {:<32} {:>8.3} ms  {:>5.1}%", "(timers' overhead, drops)", (step_med - listed) * 1e3, 100.0 * (step_med - listed) / step_med);

    // ---- The linear layers of one step in other layouts. ----
    // Each layout runs every linear layer of a step on its own weights (10 layers + head,
    // ~69 MB of f32), so the weights stream from memory as in a real decode; the per-call
    // columns instead repeat one weight, which then sits in cache.
    let shapes: Vec<(&str, usize, usize, usize)> = vec![
        ("q/o 384x384", D_MODEL, HEADS * HEAD_DIM, 2 * LAYERS),
        ("k/v 384->128", D_MODEL, KV_HEADS * HEAD_DIM, 2 * LAYERS),
        ("gate/up 384->1024", D_MODEL, INTER, 2 * LAYERS),
        ("down 1024->384", INTER, D_MODEL, LAYERS),
        ("lm_head 384->4096", D_MODEL, CODES, 1),
    ];
    let layouts = ["x.W^T (now)", "x.Wt pre-transposed", "Q8_0 QMatMul", "2 x one row"];
    struct Lin {
        w: Tensor,
        wt: Tensor,
        q: QMatMul,
        x: Tensor,
        x1: Tensor,
    }
    let lins: Vec<(usize, Lin)> = shapes
        .iter()
        .enumerate()
        .flat_map(|(si, &(_, i, o, calls))| {
            let dev = &dev;
            (0..calls).map(move |_| {
                let w = randn((o, i), dev);
                let wt = w.t().unwrap().contiguous().unwrap();
                let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
                let x = Tensor::randn(0f32, 1.0, (B, i), dev).unwrap();
                let x1 = Tensor::randn(0f32, 1.0, (1, i), dev).unwrap();
                (si, Lin { w, wt, q, x, x1 })
            })
        })
        .collect();
    let run = |layout: usize, l: &Lin| match layout {
        0 => drop(std::hint::black_box(l.x.matmul(&l.w.t().unwrap()).unwrap())),
        1 => drop(std::hint::black_box(l.x.matmul(&l.wt).unwrap())),
        2 => drop(std::hint::black_box(l.q.forward(&l.x).unwrap())),
        _ => {
            for _ in 0..B {
                std::hint::black_box(l.x1.matmul(&l.w.t().unwrap()).unwrap());
            }
        }
    };
    let timed = |f: &dyn Fn(), reps: usize| {
        for _ in 0..3 {
            f();
        }
        median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    println!("\nall linear layers of one step, each on its own weights (streamed), median over 30 steps:");
    let mut streamed = [0f64; 4];
    for (li, name) in layouts.iter().enumerate() {
        streamed[li] = timed(&|| lins.iter().for_each(|(_, l)| run(li, l)), 30);
        println!("  {name:<22} {:>8.3} ms", streamed[li] * 1e3);
    }
    println!("\nper call with one weight repeated (hot in cache), median over 60 calls:");
    println!("  {:<20} {:>5} {:>14} {:>14} {:>14} {:>14}", "shape", "calls", layouts[0], "pre-transposed", "Q8_0", "2 x one row");
    for (si, &(name, _, _, calls)) in shapes.iter().enumerate() {
        let l = &lins.iter().find(|(s, _)| *s == si).unwrap().1;
        let t: Vec<f64> = (0..4).map(|li| timed(&|| run(li, l), 60)).collect();
        println!(
            "  {name:<20} {calls:>5} {:>11.1} us {:>11.1} us {:>11.1} us {:>11.1} us",
            t[0] * 1e6,
            t[1] * 1e6,
            t[2] * 1e6,
            t[3] * 1e6
        );
    }
}
