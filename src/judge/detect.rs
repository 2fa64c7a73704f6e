//! Finding the objects and signs of an image.
//!
//! 1. Every pixel gets the nearest colour among the palette and the background tints; tints,
//!    and anything far from every palette colour, become "background".
//! 2. 4-connected regions of one palette colour are the candidates. The plain background is the
//!    colour that fills most of the image border; its regions touching the border are dropped.
//!    So are thin regions (blur fringes between two colours: under 30% of their pixels have all
//!    four neighbours in the region) and tiny ones.
//! 3. A rectangular region with holes is a sign; its text is read by `text::read`. Regions
//!    inside a sign are its letters. A sign whose letters reach its edge is rectangular only
//!    once its row and column spans are filled; it is taken when that fill is mostly ink and a
//!    word is read on it.
//! 4. Every other region is an object. Its shape is the outline (from `world::shapes`) that,
//!    fitted to the region's bounding box, overlaps it best (soft IoU).

use image::RgbImage;

use crate::world::palette::{self, Color, Tint};
use crate::world::spec::{Cell, Shape, Size};

use super::{shape, text};

/// Pixels farther than this (RGB distance) from every palette colour are background.
const ACCEPT: u32 = 80 * 80;
/// Label of background pixels.
const BG: u8 = u8::MAX;
/// A region is an object only if its best shape fits at least this well.
const MIN_IOU: f32 = 0.6;

/// One detected object. Positions and extent are fractions, as in `world::spec::Object`.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    /// Best-fitting shape (`None` when nothing fits well).
    pub shape: Option<Shape>,
    pub color: Color,
    pub size: Size,
    pub extent: f64,
    /// Bounding-box centre.
    pub x: f64,
    pub y: f64,
    /// Soft IoU of the best shape.
    pub iou: f32,
}

impl Detected {
    pub fn cell(&self) -> Cell {
        Cell::of(self.x, self.y)
    }
}

/// One detected sign.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectedSign {
    pub color: Color,
    /// The text read from it (uppercase; empty if unreadable).
    pub word: String,
    /// Centre, as fractions.
    pub x: f64,
    pub y: f64,
}

/// Everything found in an image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Detection {
    /// The plain palette colour of the background, if the border is mostly one.
    pub background: Option<Color>,
    pub objects: Vec<Detected>,
    pub signs: Vec<DetectedSign>,
}

/// The palette index of the nearest colour, or `BG`.
fn classify(p: [u8; 3]) -> u8 {
    let (mut best, mut bd) = (BG, u32::MAX);
    for c in Color::ALL {
        let d = palette::dist2(p, c.rgb());
        if d < bd {
            (best, bd) = (c as u8, d);
        }
    }
    if bd > ACCEPT || Tint::ALL.iter().any(|t| palette::dist2(p, t.rgb()) < bd) { BG } else { best }
}

/// A connected region of one colour class.
struct Region {
    class: u8,
    pixels: Vec<u32>,
    bbox: [u32; 4], // x0, y0, x1, y1 (exclusive)
    touches_border: bool,
}

fn regions(labels: &[u8], w: u32, h: u32) -> (Vec<Region>, Vec<u32>) {
    let n = (w * h) as usize;
    let mut comp = vec![u32::MAX; n];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..n {
        if labels[start] == BG || comp[start] != u32::MAX {
            continue;
        }
        let class = labels[start];
        let id = out.len() as u32;
        let mut r = Region { class, pixels: Vec::new(), bbox: [w, h, 0, 0], touches_border: false };
        comp[start] = id;
        stack.push(start as u32);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            r.pixels.push(i);
            r.bbox = [r.bbox[0].min(x), r.bbox[1].min(y), r.bbox[2].max(x + 1), r.bbox[3].max(y + 1)];
            r.touches_border |= x == 0 || y == 0 || x == w - 1 || y == h - 1;
            let mut visit = |j: u32| {
                if labels[j as usize] == class && comp[j as usize] == u32::MAX {
                    comp[j as usize] = id;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        out.push(r);
    }
    (out, comp)
}

/// The region's mask over its bounding box with holes filled, and the number of hole pixels.
fn filled_mask(r: &Region, comp: &[u32], id: u32, w: u32) -> (Vec<bool>, usize) {
    let [x0, y0, x1, y1] = r.bbox;
    let (bw, bh) = ((x1 - x0) as usize, (y1 - y0) as usize);
    let inside = |lx: usize, ly: usize| comp[((y0 as usize + ly) * w as usize) + x0 as usize + lx] == id;
    // Flood the outside from the bounding box's edge; whatever it cannot reach is filled.
    let mut outside = vec![false; bw * bh];
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for lx in 0..bw {
        stack.push((lx, 0));
        stack.push((lx, bh - 1));
    }
    for ly in 0..bh {
        stack.push((0, ly));
        stack.push((bw - 1, ly));
    }
    while let Some((lx, ly)) = stack.pop() {
        let k = ly * bw + lx;
        if outside[k] || inside(lx, ly) {
            continue;
        }
        outside[k] = true;
        if lx > 0 {
            stack.push((lx - 1, ly));
        }
        if lx + 1 < bw {
            stack.push((lx + 1, ly));
        }
        if ly > 0 {
            stack.push((lx, ly - 1));
        }
        if ly + 1 < bh {
            stack.push((lx, ly + 1));
        }
    }
    let mask: Vec<bool> = outside.iter().map(|o| !o).collect();
    let holes = mask.iter().filter(|m| **m).count() - r.pixels.len();
    (mask, holes)
}

/// Pixels of the region's bounding box that lie between two of its pixels on the same row or
/// on the same column. Unlike [`filled_mask`], a letter whose stroke reaches the sign's edge
/// (blurred, or drawn too close) still counts as covered, since the sign continues on both of
/// its sides along that row. Returns the covered pixels, the covered pixels outside the region
/// (the gaps), and how many of those are of class `ink` or background (unclassified).
fn span_filled(r: &Region, comp: &[u32], id: u32, w: u32, labels: &[u8], ink: u8) -> (usize, usize, usize) {
    let [x0, y0, x1, y1] = r.bbox;
    let (bw, bh) = ((x1 - x0) as usize, (y1 - y0) as usize);
    let inside = |lx: usize, ly: usize| comp[((y0 as usize + ly) * w as usize) + x0 as usize + lx] == id;
    let mut covered = vec![false; bw * bh];
    for ly in 0..bh {
        let xs: Vec<usize> = (0..bw).filter(|&lx| inside(lx, ly)).collect();
        if let (Some(&a), Some(&b)) = (xs.first(), xs.last()) {
            (a..=b).for_each(|lx| covered[ly * bw + lx] = true);
        }
    }
    for lx in 0..bw {
        let ys: Vec<usize> = (0..bh).filter(|&ly| inside(lx, ly)).collect();
        if let (Some(&a), Some(&b)) = (ys.first(), ys.last()) {
            (a..=b).for_each(|ly| covered[ly * bw + lx] = true);
        }
    }
    let (mut n, mut gaps, mut inked) = (0, 0, 0);
    for (k, _) in covered.iter().enumerate().filter(|(_, c)| **c) {
        let i = (y0 as usize + k / bw) * w as usize + x0 as usize + k % bw;
        n += 1;
        if comp[i] != id {
            gaps += 1;
            inked += (labels[i] == ink || labels[i] == BG) as usize;
        }
    }
    (n, gaps, inked)
}

/// Fraction of a region's pixels whose four neighbours are all in the region.
fn interior_fraction(r: &Region, comp: &[u32], id: u32, w: u32, h: u32) -> f32 {
    let inner = r
        .pixels
        .iter()
        .filter(|&&i| {
            let (x, y) = (i % w, i / w);
            x > 0
                && y > 0
                && x + 1 < w
                && y + 1 < h
                && [i - 1, i + 1, i - w, i + w].iter().all(|&j| comp[j as usize] == id)
        })
        .count();
    inner as f32 / r.pixels.len() as f32
}

/// Find the background, objects and signs of `img`.
pub fn detect(img: &RgbImage) -> Detection {
    let (w, h) = img.dimensions();
    if w < 8 || h < 8 {
        return Detection::default();
    }
    let labels: Vec<u8> = img.pixels().map(|p| classify(p.0)).collect();
    let background = border_class(&labels, w, h);
    let (regs, comp) = regions(&labels, w, h);
    let unit = w.min(h) as f32 / 128.0;
    let min_area = (50.0 * unit * unit) as usize;
    // Each region is background, solid (an object or a sign), or neither (fringes, specks).
    let is_bg: Vec<bool> = regs
        .iter()
        .map(|r| (Some(r.class) == background.map(|c| c as u8) && r.touches_border) || r.pixels.len() * 2 > (w * h) as usize)
        .collect();
    let solid: Vec<bool> = regs
        .iter()
        .enumerate()
        .map(|(id, r)| !is_bg[id] && r.pixels.len() >= min_area && interior_fraction(r, &comp, id as u32, w, h) >= 0.3)
        .collect();
    let mut signs: Vec<(DetectedSign, [u32; 4])> = Vec::new();
    let mut candidates = Vec::new();
    let sign_at = |r: &Region, word: String| {
        let [x0, y0, x1, y1] = r.bbox;
        let sign = DetectedSign {
            color: Color::ALL[r.class as usize],
            word,
            x: (x0 + x1) as f64 / 2.0 / w as f64,
            y: (y0 + y1) as f64 / 2.0 / h as f64,
        };
        (sign, r.bbox)
    };
    let inside = |b: [u32; 4], s: [u32; 4]| b[0] >= s[0] && b[1] >= s[1] && b[2] <= s[2] && b[3] <= s[3];
    for (id, r) in regs.iter().enumerate().filter(|(id, _)| solid[*id]) {
        let (mask, holes) = filled_mask(r, &comp, id as u32, w);
        let [x0, y0, x1, y1] = r.bbox;
        let box_area = ((x1 - x0) * (y1 - y0)) as usize;
        let filled = mask.iter().filter(|m| **m).count();
        let rectangular = filled as f32 >= 0.9 * box_area as f32;
        if rectangular && holes as f32 >= 0.03 * box_area as f32 && x1 - x0 >= 8 && y1 - y0 >= 8 {
            let word = text::read(img, r.bbox, Color::ALL[r.class as usize]).unwrap_or_default();
            signs.push(sign_at(r, word));
        } else {
            candidates.push(id);
        }
    }
    // Signs whose letters reach their edge (blurred, or drawn too close) leave the hole-filled
    // mask short of its box. Such a region is a sign when it is rectangular once its row and
    // column spans are filled, at least half of what the spans add is the sign colour's ink or
    // unclassified (blurred ink), so a square notched by another object is no sign, it lies
    // inside no sign found so far, and a word is read on it.
    // Largest first, so a sign is found before its own letters could be taken for one.
    candidates.sort_by_key(|&id| {
        let [x0, y0, x1, y1] = regs[id].bbox;
        std::cmp::Reverse((x1 - x0) * (y1 - y0))
    });
    let mut objects_left = Vec::new();
    for id in candidates {
        let r = &regs[id];
        let [x0, y0, x1, y1] = r.bbox;
        let box_area = ((x1 - x0) * (y1 - y0)) as usize;
        let color = Color::ALL[r.class as usize];
        let open_sign = x1 - x0 >= 8 && y1 - y0 >= 8 && !signs.iter().any(|(_, s)| inside(r.bbox, *s)) && {
            let (spans, gaps, inked) = span_filled(r, &comp, id as u32, w, &labels, color.ink() as u8);
            spans as f32 >= 0.9 * box_area as f32 && gaps as f32 >= 0.03 * box_area as f32 && 2 * inked >= gaps
        };
        match open_sign.then(|| text::read(img, r.bbox, color)).flatten() {
            Some(word) if !word.is_empty() => signs.push(sign_at(r, word)),
            _ => objects_left.push(id),
        }
    }
    objects_left.sort_unstable();
    let candidates = objects_left;
    let in_sign = |b: [u32; 4]| signs.iter().any(|(_, s)| inside(b, *s));
    let candidates: Vec<usize> = candidates.into_iter().filter(|&id| !in_sign(regs[id].bbox)).collect();
    let pixel_bg: Vec<bool> = comp.iter().map(|&c| c == u32::MAX || is_bg[c as usize]).collect();
    let plain = background.map(|c| {
        // The measured colour of the plain background, from the border pixels of its class.
        let (mut acc, mut n) = ([0.0f32; 3], 0.0f32);
        for (i, p) in img.pixels().enumerate() {
            let (x, y) = (i as u32 % w, i as u32 / w);
            if (x == 0 || y == 0 || x == w - 1 || y == h - 1) && labels[i] == c as u8 {
                (0..3).for_each(|k| acc[k] += p.0[k] as f32);
                n += 1.0;
            }
        }
        acc.map(|v| v / n.max(1.0))
    });
    let bg_est = shape::background_estimate(img, &pixel_bg, plain);
    let objects = candidates
        .into_iter()
        .filter_map(|id| {
            let r = &regs[id];
            let other = |i: usize| comp[i] != id as u32 && comp[i] != u32::MAX && solid[comp[i] as usize];
            let fit = shape::fit(img, bg_est.as_deref(), &comp, id as u32, &r.pixels, r.bbox, &other)?;
            let extent = fit.size as f64 / w.min(h) as f64;
            Some(Detected {
                shape: (fit.iou >= MIN_IOU).then_some(fit.shape),
                color: Color::ALL[r.class as usize],
                size: Size::classify(extent),
                extent,
                x: fit.cx as f64 / w as f64,
                y: fit.cy as f64 / h as f64,
                iou: fit.iou,
            })
        })
        .collect();
    Detection { background, objects, signs: signs.into_iter().map(|(s, _)| s).collect() }
}

/// The palette class filling at least half of the border, if any.
fn border_class(labels: &[u8], w: u32, h: u32) -> Option<Color> {
    let mut counts = [0usize; 12];
    let mut total = 0;
    let mut add = |x: u32, y: u32| {
        let l = labels[(y * w + x) as usize];
        counts[if l == BG { 11 } else { l as usize }] += 1;
        total += 1;
    };
    for x in 0..w {
        add(x, 0);
        add(x, h - 1);
    }
    for y in 1..h - 1 {
        add(0, y);
        add(w - 1, y);
    }
    let (best, n) = counts[..11].iter().enumerate().max_by_key(|(_, n)| **n)?;
    (*n * 2 >= total).then(|| Color::ALL[best])
}

