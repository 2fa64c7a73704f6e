//! Shape classification by analysis-by-synthesis.
//!
//! Blur and JPEG erode the hard colour regions unevenly (a yellow disc on red grows an orange
//! fringe, thin star tips fade), so the fit works on a soft matte instead: every pixel near the
//! region is unmixed as `alpha * object + (1 - alpha) * background`, with the background
//! colour taken from the nearest pixel that is surely background. Each outline of
//! `world::shapes` is then rendered at the matte's box (at a few scales, blurred by a few
//! sigmas, as the image may be) and compared by soft IoU; the best outline wins.

use image::RgbImage;

use crate::world::shapes;
use crate::world::spec::Shape;

/// The background colour behind every pixel. A plain background is one colour everywhere;
/// otherwise sure background pixels keep their colour, and the rest take the colour of the
/// nearest sure one (4-connected BFS). `None` if nothing is sure.
pub(crate) fn background_estimate(img: &RgbImage, is_background: &[bool], plain: Option<[f32; 3]>) -> Option<Vec<[f32; 3]>> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    if let Some(c) = plain {
        return Some(vec![c; w * h]);
    }
    // Sure: background, and at least 3 px (Chebyshev) from anything that is not.
    let mut near = vec![false; w * h];
    const R: usize = 2;
    for y in 0..h {
        for x in 0..w {
            if !is_background[y * w + x] {
                for yy in y.saturating_sub(R)..(y + R + 1).min(h) {
                    for xx in x.saturating_sub(R)..(x + R + 1).min(w) {
                        near[yy * w + xx] = true;
                    }
                }
            }
        }
    }
    let mut est = vec![[0.0f32; 3]; w * h];
    let mut done = vec![false; w * h];
    let mut queue = std::collections::VecDeque::new();
    for i in 0..w * h {
        if is_background[i] && !near[i] {
            let p = img.as_raw();
            est[i] = [p[3 * i] as f32, p[3 * i + 1] as f32, p[3 * i + 2] as f32];
            done[i] = true;
            queue.push_back(i);
        }
    }
    if queue.is_empty() {
        return None;
    }
    while let Some(i) = queue.pop_front() {
        let (x, y) = (i % w, i / w);
        let mut go = |j: usize| {
            if !done[j] {
                done[j] = true;
                est[j] = est[i];
                queue.push_back(j);
            }
        };
        if x > 0 {
            go(i - 1);
        }
        if x + 1 < w {
            go(i + 1);
        }
        if y > 0 {
            go(i - w);
        }
        if y + 1 < h {
            go(i + w);
        }
    }
    Some(est)
}

/// The result of fitting outlines to a region.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fit {
    pub shape: Shape,
    pub iou: f32,
    /// Longer side of the fitted (unblurred) outline, in pixels.
    pub size: f32,
    pub cx: f32,
    pub cy: f32,
}

/// A soft matte on a window of the image.
struct Matte {
    x0: u32,
    y0: u32,
    w: usize,
    h: usize,
    alpha: Vec<f32>,
}

/// Fit the outlines to the region whose pixels are `pixels` (indices into the image, all
/// labelled `id` in `comp`). `other(i)` says pixel `i` belongs to another object or sign.
pub(crate) fn fit(
    img: &RgbImage,
    bg: Option<&[[f32; 3]]>,
    comp: &[u32],
    id: u32,
    pixels: &[u32],
    bbox: [u32; 4],
    other: &dyn Fn(usize) -> bool,
) -> Option<Fit> {
    let matte = matte(img, bg, comp, id, pixels, bbox, other);
    // The matte's box at alpha 0.5.
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for y in 0..matte.h {
        for x in 0..matte.w {
            if matte.alpha[y * matte.w + x] >= 0.5 {
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
            }
        }
    }
    if x0 >= x1 || y0 >= y1 {
        return None;
    }
    let (bw, bh) = ((x1 - x0) as f32, (y1 - y0) as f32);
    let (cx, cy) = ((x0 + x1) as f32 / 2.0, (y0 + y1) as f32 / 2.0);
    let n = matte.w * matte.h;
    let (mut base, mut cov, mut tmp, mut row) = (vec![0.0f32; n], vec![0.0f32; n], Vec::new(), Vec::new());
    // Render `shape` at scale factor `f`, then score it under each blur: (sigma, IoU, error).
    let mut score = |shape: Shape, f: f32, sigmas: &[f32]| -> Vec<(f32, f32, f32)> {
        let (aw, ah) = shapes::aspect(shape);
        let s = (bw / aw).max(bh / ah) * f;
        base.iter_mut().for_each(|c| *c = 0.0);
        let poly = shapes::place(shape, cx, cy, s);
        shapes::rasterize(&poly, matte.w as u32, matte.h as u32, &mut row, |x, y, c| {
            base[y as usize * matte.w + x as usize] = c;
        });
        sigmas
            .iter()
            .map(|&sigma| {
                cov.copy_from_slice(&base);
                if sigma > 0.0 {
                    blur(&mut cov, &mut tmp, matte.w, matte.h, sigma);
                }
                (sigma, soft_iou(&matte.alpha, &cov), ssd(&matte.alpha, &cov))
            })
            .collect()
    };
    // Coarse pass on every outline, then scales and blurs on the three best. The criterion is the
    // squared error (it only counts the pixels where two outlines disagree); IoU is reported.
    let mut coarse: Vec<(Shape, f32)> = Shape::ALL.iter().map(|&s| (s, score(s, 1.0, &[0.0])[0].2)).collect();
    coarse.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut best: Option<(Shape, f32, f32, f32)> = None;
    for &(shape, _) in &coarse[..3] {
        for f in [0.95, 1.0, 1.05, 1.1] {
            for (_, iou, err) in score(shape, f, &[0.0, 1.0, 1.8]) {
                if best.is_none_or(|b| err < b.3) {
                    best = Some((shape, iou, f, err));
                }
            }
        }
    }
    let (shape, iou, f, _) = best?;
    let (aw, ah) = shapes::aspect(shape);
    Some(Fit {
        shape,
        iou,
        size: (bw / aw).max(bh / ah) * f,
        cx: matte.x0 as f32 + cx,
        cy: matte.y0 as f32 + cy,
    })
}

/// Unmix the pixels within 5 px of the region (and the region itself) against the estimated
/// background. Without an estimate, the matte is the region itself.
fn matte(
    img: &RgbImage,
    bg: Option<&[[f32; 3]]>,
    comp: &[u32],
    id: u32,
    pixels: &[u32],
    bbox: [u32; 4],
    other: &dyn Fn(usize) -> bool,
) -> Matte {
    let (iw, ih) = img.dimensions();
    const M: u32 = 8;
    let (x0, y0) = (bbox[0].saturating_sub(M), bbox[1].saturating_sub(M));
    let (x1, y1) = ((bbox[2] + M).min(iw), (bbox[3] + M).min(ih));
    let (w, h) = ((x1 - x0) as usize, (y1 - y0) as usize);
    let raw = img.as_raw();
    let px = |i: usize| [raw[3 * i] as f32, raw[3 * i + 1] as f32, raw[3 * i + 2] as f32];
    // The object's colour: the mean over its interior (edge pixels are blends).
    let interior = |i: u32| {
        let (x, y) = (i % iw, i / iw);
        x > 0 && y > 0 && x + 1 < iw && y + 1 < ih && [i - 1, i + 1, i - iw, i + iw].iter().all(|&j| comp[j as usize] == id)
    };
    let (mut c, mut n) = ([0.0f32; 3], 0usize);
    for &i in pixels.iter().filter(|&&i| interior(i)) {
        let p = px(i as usize);
        (0..3).for_each(|k| c[k] += p[k]);
        n += 1;
    }
    if n == 0 {
        for &i in pixels {
            let p = px(i as usize);
            (0..3).for_each(|k| c[k] += p[k]);
        }
        n = pixels.len().max(1);
    }
    let c = c.map(|v| v / n as f32);
    // Pixels within 5 steps (8-connected) of the region, not crossing other objects.
    let mut depth = vec![u8::MAX; w * h];
    let mut queue = std::collections::VecDeque::new();
    for &i in pixels {
        let (x, y) = (i % iw, i / iw);
        let k = (y - y0) as usize * w + (x - x0) as usize;
        depth[k] = 0;
        queue.push_back(k);
    }
    while let Some(k) = queue.pop_front() {
        let d = depth[k];
        if d >= 5 {
            continue;
        }
        let (x, y) = (k % w, k / w);
        for yy in y.saturating_sub(1)..(y + 2).min(h) {
            for xx in x.saturating_sub(1)..(x + 2).min(w) {
                let kk = yy * w + xx;
                let i = (y0 as usize + yy) * iw as usize + x0 as usize + xx;
                if depth[kk] == u8::MAX && !other(i) {
                    depth[kk] = d + 1;
                    queue.push_back(kk);
                }
            }
        }
    }
    let mut alpha = vec![0.0f32; w * h];
    for k in 0..w * h {
        if depth[k] == u8::MAX {
            continue;
        }
        let i = (y0 as usize + k / w) * iw as usize + x0 as usize + k % w;
        let inside = comp[i] == id;
        alpha[k] = match bg {
            Some(bg) => {
                let b = bg[i];
                let d = [c[0] - b[0], c[1] - b[1], c[2] - b[2]];
                let n = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
                if n < 900.0 {
                    inside as u8 as f32
                } else {
                    let p = px(i);
                    let t = ((p[0] - b[0]) * d[0] + (p[1] - b[1]) * d[1] + (p[2] - b[2]) * d[2]) / n;
                    t.clamp(0.0, 1.0)
                }
            }
            None => inside as u8 as f32,
        };
    }
    // Keep only the part of {alpha >= 1/2} connected to the region: a neighbour's fringe can
    // unmix to a high alpha too.
    let mut keep = vec![false; w * h];
    let mut stack: Vec<usize> = pixels
        .iter()
        .map(|&i| (i / iw - y0) as usize * w + (i % iw - x0) as usize)
        .filter(|&k| alpha[k] >= 0.5)
        .collect();
    stack.iter().for_each(|&k| keep[k] = true);
    while let Some(k) = stack.pop() {
        let (x, y) = (k % w, k / w);
        for yy in y.saturating_sub(1)..(y + 2).min(h) {
            for xx in x.saturating_sub(1)..(x + 2).min(w) {
                let kk = yy * w + xx;
                if !keep[kk] && alpha[kk] >= 0.5 {
                    keep[kk] = true;
                    stack.push(kk);
                }
            }
        }
    }
    for (a, k) in alpha.iter_mut().zip(&keep) {
        if *a >= 0.5 && !k {
            *a = 0.0;
        }
    }
    Matte { x0, y0, w, h, alpha }
}

fn ssd(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn soft_iou(a: &[f32], b: &[f32]) -> f32 {
    let (mut inter, mut union) = (0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        inter += x.min(*y);
        union += x.max(*y);
    }
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Separable Gaussian blur of a `w` x `h` grid (zero outside).
pub(crate) fn blur(grid: &mut [f32], tmp: &mut Vec<f32>, w: usize, h: usize, sigma: f32) {
    let r = (2.5 * sigma).ceil() as usize;
    let kernel: Vec<f32> = (0..=2 * r).map(|i| (-((i as f32 - r as f32).powi(2)) / (2.0 * sigma * sigma)).exp()).collect();
    let sum: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / sum).collect();
    tmp.clear();
    tmp.resize(w * h, 0.0);
    // Output x takes inputs x - r ..= x + r, clipped to the grid.
    let taps = |x: usize, len: usize| (x.saturating_sub(r), (x + r).min(len - 1), r + x.saturating_sub(r) - x);
    for y in 0..h {
        let src = &grid[y * w..(y + 1) * w];
        for x in 0..w {
            let (a, b, k0) = taps(x, w);
            tmp[y * w + x] = src[a..=b].iter().zip(&kernel[k0..]).map(|(v, k)| v * k).sum();
        }
    }
    for y in 0..h {
        let (a, b, k0) = taps(y, h);
        let out = &mut grid[y * w..(y + 1) * w];
        out.iter_mut().for_each(|v| *v = 0.0);
        for (yy, k) in (a..=b).zip(&kernel[k0..]) {
            for (o, v) in out.iter_mut().zip(&tmp[yy * w..(yy + 1) * w]) {
                *o += k * v;
            }
        }
    }
}
