//! Memory bandwidth of this machine: a large read and a large copy, with 1 and 2 threads,
//! at several working-set sizes (the default model's ~70 MB of weights can sit in a large
//! L3, so the sizes straddle it).
//!
//! ```sh
//! cargo bench --bench membw                 # sizes 16 MiB .. 1 GiB, 1 and 2 threads
//! cargo bench --bench membw -- 1024 256     # only these sizes, in MiB
//! ```
//!
//! read: sum of u64 words (8 independent accumulators so it vectorizes), GB/s = bytes / s.
//! copy: `copy_from_slice` (memcpy), GB/s counts read + write = 2 x bytes / s (STREAM's
//! convention). Each thread works on its own contiguous slice; the buffers are written
//! once before timing so every page is mapped. Medians (and the best run) over repeats.

use std::hint::black_box;
use std::time::Instant;

#[inline(always)]
fn read_sum_generic(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 16];
    let chunks = buf.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] = acc[j].wrapping_add(c[j]);
        }
    }
    acc.iter().chain(rest).fold(0u64, |a, &b| a.wrapping_add(b))
}

/// The same loop compiled for AVX2 (32-byte loads), so that the read is limited by the
/// memory system and not by the instructions even when the buffer sits in cache.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn read_sum_avx2(buf: &[u64]) -> u64 {
    read_sum_generic(buf)
}

fn read_sum(buf: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // Safety: AVX2 is present (checked at run time).
        return unsafe { read_sum_avx2(buf) };
    }
    read_sum_generic(buf)
}

fn parallel<F: Fn(usize) + Sync>(threads: usize, f: F) {
    if threads == 1 {
        f(0);
        return;
    }
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || f(t));
        }
    });
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes_mib = if args.is_empty() { vec![16, 64, 128, 256, 1024] } else { args };
    let max_threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(2);
    println!("{:>8} {:>7} {:>13} {:>10} {:>10} {:>10}", "MiB", "threads", "read median", "best", "copy median", "best");
    for &mib in &sizes_mib {
        let words = mib * (1 << 20) / 8;
        let src: Vec<u64> = (0..words as u64).collect();
        let mut dst: Vec<u64> = vec![1; words];
        // Enough repeats for ~2 GiB of traffic per measurement, at least 5.
        let reps = (2048 / mib).clamp(5, 200);
        for threads in 1..=max_threads {
            let per = words.div_ceil(threads);
            let mut read = Vec::new();
            let mut copy = Vec::new();
            for _ in 0..reps {
                let t = Instant::now();
                parallel(threads, |i| {
                    let lo = (i * per).min(words);
                    let hi = ((i + 1) * per).min(words);
                    black_box(read_sum(black_box(&src[lo..hi])));
                });
                read.push((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);

                let dst_ptr = dst.as_mut_ptr() as usize;
                let t = Instant::now();
                parallel(threads, |i| {
                    let lo = (i * per).min(words);
                    let hi = ((i + 1) * per).min(words);
                    // Safety: each thread writes its own disjoint range [lo, hi) of dst.
                    let d = unsafe { std::slice::from_raw_parts_mut((dst_ptr as *mut u64).add(lo), hi - lo) };
                    d.copy_from_slice(&src[lo..hi]);
                });
                copy.push((2 * words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
                black_box(&mut dst);
            }
            let rb = read.iter().cloned().fold(0f64, f64::max);
            let cb = copy.iter().cloned().fold(0f64, f64::max);
            println!(
                "{mib:>8} {threads:>7} {:>8.1} GB/s {:>5.1} GB/s {:>6.1} GB/s {:>5.1} GB/s",
                median(&mut read),
                rb,
                median(&mut copy),
                cb
            );
        }
    }
}
