//! The one sampler: classifier-free guidance, temperature, top-k, top-p and a seeded draw.
//!
//! It works on the logits of the candidate tokens only (the visual tokens, which is all the
//! prefix constraint allows inside a row). transformers' guidance combines log-softmaxed
//! scores, `g * (lc - lu) + lu`; restricted to candidates that equals
//! `g * (c - u) + u` minus a constant, which no later step (top-k, top-p, softmax, argmax)
//! can see, so the distribution is exactly the reference's.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Sampling settings of one image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Classifier-free guidance scale; 1 disables guidance (no unconditional pass).
    pub cfg: f64,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely candidates (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of candidates whose probability reaches p (1 = all).
    pub top_p: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { cfg: 3.0, temperature: 1.0, top_k: 0, top_p: 1.0 }
    }
}

impl SamplingParams {
    pub fn greedy(cfg: f64) -> Self {
        Self { cfg, temperature: 0.0, top_k: 0, top_p: 1.0 }
    }

    pub fn uses_guidance(&self) -> bool {
        self.cfg != 1.0
    }
}

/// A seeded sampler for one image. The same seed and logits give the same tokens, on any
/// machine and thread count: the RNG is ChaCha8 and all arithmetic here is sequential.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self { params, rng: ChaCha8Rng::seed_from_u64(seed), scratch: Vec::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Guided scores of the candidates: `g * (cond - uncond) + uncond`, or `cond` alone.
    pub fn guide(&self, cond: &[f32], uncond: Option<&[f32]>, out: &mut Vec<f32>) {
        out.clear();
        match uncond {
            Some(u) if self.params.uses_guidance() => {
                let g = self.params.cfg as f32;
                out.extend(cond.iter().zip(u).map(|(&c, &u)| g * (c - u) + u));
            }
            _ => out.extend_from_slice(cond),
        }
    }

    /// Pick a candidate index from guided scores.
    pub fn sample(&mut self, scores: &[f32]) -> usize {
        let p = self.params;
        if p.temperature <= 0.0 {
            return argmax(scores);
        }
        let t = p.temperature as f32;
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(scores.iter().enumerate().map(|(i, &s)| (s / t, i as u32)));
        // Most likely first; ties keep the lower index first, like a stable sort.
        let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < cand.len() {
            // Select the k best in linear time and sort only those (the same prefix a full sort
            // gives). transformers keeps every score equal to the k-th one: move those up too.
            cand.select_nth_unstable_by(p.top_k - 1, order);
            let kth = cand[p.top_k - 1].0;
            let mut keep = p.top_k;
            for i in p.top_k..cand.len() {
                if cand[i].0 >= kth {
                    cand.swap(keep, i);
                    keep += 1;
                }
            }
            cand.truncate(keep);
        }
        cand.sort_unstable_by(order);
        let max = cand[0].0;
        let mut total = 0f64;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|c| {
                let e = ((c.0 - max) as f64).exp();
                total += e;
                e
            })
            .collect();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    acc += q;
                    acc >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= s);
        }
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        for (q, c) in probs.iter().zip(cand.iter()) {
            acc += q;
            if u < acc {
                return c.1 as usize;
            }
        }
        cand[probs.len() - 1].1 as usize
    }
}

/// Index of the first maximum (torch's argmax picks the first too).
pub fn argmax(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_matches_log_softmax_form() {
        // g*(logsoftmax(c) - logsoftmax(u)) + logsoftmax(u) differs from g*(c-u)+u by a constant.
        let c = [1.0f32, 2.0, 0.5];
        let u = [0.3f32, -1.0, 2.0];
        let ls = |x: &[f32]| {
            let m = x.iter().cloned().fold(f32::MIN, f32::max);
            let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
            x.iter().map(|v| v - lse).collect::<Vec<_>>()
        };
        let (lc, lu) = (ls(&c), ls(&u));
        let s = Sampler::new(SamplingParams { cfg: 3.0, ..Default::default() }, 0);
        let mut ours = Vec::new();
        s.guide(&c, Some(&u), &mut ours);
        let reference: Vec<f32> = lc.iter().zip(&lu).map(|(c, u)| 3.0 * (c - u) + u).collect();
        let d0 = ours[0] - reference[0];
        for (a, b) in ours.iter().zip(&reference) {
            assert!((a - b - d0).abs() < 1e-5);
        }
    }

    #[test]
    fn greedy_and_top_k_one_agree() {
        let scores = [0.1f32, 3.0, 2.9, -1.0];
        let mut g = Sampler::new(SamplingParams::greedy(1.0), 7);
        assert_eq!(g.sample(&scores), 1);
        let mut k1 = Sampler::new(SamplingParams { top_k: 1, cfg: 1.0, ..Default::default() }, 7);
        for _ in 0..20 {
            assert_eq!(k1.sample(&scores), 1);
        }
    }

    #[test]
    fn same_seed_same_draws_and_frequencies_follow_softmax() {
        let scores = [0.0f32, (2.0f32).ln(), (7.0f32).ln()]; // probs 0.1, 0.2, 0.7
        let params = SamplingParams { cfg: 1.0, ..Default::default() };
        let mut a = Sampler::new(params, 42);
        let mut b = Sampler::new(params, 42);
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            let x = a.sample(&scores);
            assert_eq!(x, b.sample(&scores));
            counts[x] += 1;
        }
        let freq: Vec<f64> = counts.iter().map(|&c| c as f64 / 20000.0).collect();
        assert!((freq[0] - 0.1).abs() < 0.015 && (freq[1] - 0.2).abs() < 0.015 && (freq[2] - 0.7).abs() < 0.015, "{freq:?}");
    }

    #[test]
    fn top_k_selection_draws_like_a_full_sort() {
        // Reference: the full sort then truncation (with ties at the k-th score kept).
        fn reference(scores: &[f32], k: usize, u: f64) -> usize {
            let mut c: Vec<(f32, u32)> = scores.iter().enumerate().map(|(i, &s)| (s, i as u32)).collect();
            c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let kth = c[k - 1].0;
            c.retain(|x| x.0 >= kth);
            let m = c[0].0;
            let e: Vec<f64> = c.iter().map(|x| ((x.0 - m) as f64).exp()).collect();
            let total: f64 = e.iter().sum();
            let mut acc = 0.0;
            for (q, x) in e.iter().zip(&c) {
                acc += q / total;
                if u < acc {
                    return x.1 as usize;
                }
            }
            c[c.len() - 1].1 as usize
        }
        let mut data = ChaCha8Rng::seed_from_u64(3);
        for trial in 0..200 {
            // Coarse scores so that ties (also at the k-th place) are common.
            let n = 50 + trial % 200;
            let scores: Vec<f32> = (0..n).map(|_| (data.random::<f32>() * 8.0).round() / 2.0).collect();
            let k = 1 + trial % 40;
            let params = SamplingParams { cfg: 1.0, top_k: k, ..Default::default() };
            let mut s = Sampler::new(params, trial as u64);
            let mut draws = ChaCha8Rng::seed_from_u64(trial as u64);
            for _ in 0..5 {
                let u: f64 = draws.random();
                assert_eq!(s.sample(&scores), reference(&scores, k, u), "trial {trial}");
            }
        }
    }

    #[test]
    fn top_p_drops_the_tail() {
        let scores = [0.0f32, (2.0f32).ln(), (7.0f32).ln()]; // probs 0.1, 0.2, 0.7
        let mut s = Sampler::new(SamplingParams { cfg: 1.0, top_p: 0.65, ..Default::default() }, 1);
        for _ in 0..200 {
            assert_eq!(s.sample(&scores), 2);
        }
        let mut s = Sampler::new(SamplingParams { cfg: 1.0, top_p: 0.8, ..Default::default() }, 1);
        let mut seen = [false; 3];
        for _ in 0..500 {
            seen[s.sample(&scores)] = true;
        }
        assert_eq!(seen, [false, true, true]);
    }
}
