//! Shape outlines and the polygon rasterizer shared by the renderer and the judge.
//!
//! Every outline is a simple polygon in unit coordinates: its bounding box is centred on the
//! origin and its longer side is 1 (y points down). An object of extent `s` pixels is the
//! outline scaled by `s`, so "size" means the same thing for every shape.

use std::f32::consts::PI;
use std::sync::OnceLock;

use super::spec::Shape;

/// Star inner/outer radius ratio: chubbier than a regular pentagram (0.382), so the arms survive
/// blur at the smallest size.
const STAR_INNER: f32 = 0.47;
/// Arm thickness of the cross, as a fraction of its side.
const CROSS_ARM: f32 = 0.36;

/// The outline of `shape`, in unit coordinates.
pub fn outline(shape: Shape) -> &'static [[f32; 2]] {
    static OUTLINES: OnceLock<Vec<Vec<[f32; 2]>>> = OnceLock::new();
    let all = OUTLINES.get_or_init(|| Shape::ALL.iter().map(|&s| normalize(raw_outline(s))).collect());
    &all[shape as usize]
}

fn raw_outline(shape: Shape) -> Vec<[f32; 2]> {
    match shape {
        Shape::Circle => (0..64)
            .map(|i| {
                let t = i as f32 / 64.0 * 2.0 * PI;
                [t.cos(), t.sin()]
            })
            .collect(),
        Shape::Square => vec![[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]],
        Shape::Triangle => vec![[0.0, -0.45], [0.5, 0.45], [-0.5, 0.45]],
        Shape::Diamond => vec![[0.0, -0.5], [0.36, 0.0], [0.0, 0.5], [-0.36, 0.0]],
        Shape::Hexagon => (0..6)
            .map(|i| {
                let t = i as f32 / 6.0 * 2.0 * PI;
                [t.cos(), t.sin()]
            })
            .collect(),
        Shape::Star => (0..10)
            .map(|i| {
                let r = if i % 2 == 0 { 1.0 } else { STAR_INNER };
                let t = -PI / 2.0 + i as f32 * PI / 5.0;
                [r * t.cos(), r * t.sin()]
            })
            .collect(),
        Shape::Heart => (0..72)
            .map(|i| {
                // The classic heart curve, y flipped so the point is at the bottom.
                let t = i as f32 / 72.0 * 2.0 * PI;
                let x = 16.0 * t.sin().powi(3);
                let y = 13.0 * t.cos() - 5.0 * (2.0 * t).cos() - 2.0 * (3.0 * t).cos() - (4.0 * t).cos();
                [x, -y]
            })
            .collect(),
        Shape::Cross => {
            let a = CROSS_ARM / 2.0;
            vec![
                [-a, -0.5],
                [a, -0.5],
                [a, -a],
                [0.5, -a],
                [0.5, a],
                [a, a],
                [a, 0.5],
                [-a, 0.5],
                [-a, a],
                [-0.5, a],
                [-0.5, -a],
                [-a, -a],
            ]
        }
    }
}

/// Centre the bounding box on the origin and scale its longer side to 1.
fn normalize(points: Vec<[f32; 2]>) -> Vec<[f32; 2]> {
    let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    for &[x, y] in &points {
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
    let s = (x1 - x0).max(y1 - y0);
    points.into_iter().map(|[x, y]| [(x - cx) / s, (y - cy) / s]).collect()
}

/// Width and height of the unit outline's bounding box (the longer is 1).
pub fn aspect(shape: Shape) -> (f32, f32) {
    let pts = outline(shape);
    let w = pts.iter().map(|p| p[0]).fold(f32::MIN, f32::max) - pts.iter().map(|p| p[0]).fold(f32::MAX, f32::min);
    let h = pts.iter().map(|p| p[1]).fold(f32::MIN, f32::max) - pts.iter().map(|p| p[1]).fold(f32::MAX, f32::min);
    (w, h)
}

/// Sub-rows per pixel row. Horizontal coverage is exact, vertical is sampled 4 times.
const SUBROWS: usize = 4;

/// Rasterize a polygon given in pixel coordinates, calling `emit(x, y, coverage)` once for every
/// pixel with non-zero coverage (coverage in (0, 1]). Pixels outside `width` x `height` are
/// clipped. `row` is scratch space, reused between calls.
pub fn rasterize(
    poly: &[[f32; 2]],
    width: u32,
    height: u32,
    row: &mut Vec<f32>,
    mut emit: impl FnMut(u32, u32, f32),
) {
    if poly.len() < 3 || width == 0 || height == 0 {
        return;
    }
    let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    for &[x, y] in poly {
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    let px0 = (x0.floor().max(0.0)) as usize;
    let px1 = (x1.ceil().min(width as f32)) as usize;
    let py0 = (y0.floor().max(0.0)) as usize;
    let py1 = (y1.ceil().min(height as f32)) as usize;
    if px0 >= px1 || py0 >= py1 {
        return;
    }
    let span_w = px1 - px0;
    let mut xs: Vec<f32> = Vec::with_capacity(16);
    for py in py0..py1 {
        row.clear();
        row.resize(span_w, 0.0);
        for sub in 0..SUBROWS {
            let sy = py as f32 + (sub as f32 + 0.5) / SUBROWS as f32;
            xs.clear();
            for i in 0..poly.len() {
                let [ax, ay] = poly[i];
                let [bx, by] = poly[(i + 1) % poly.len()];
                // Half-open rule on y so a vertex exactly on the sub-row is counted once.
                if (ay <= sy && by > sy) || (by <= sy && ay > sy) {
                    xs.push(ax + (sy - ay) / (by - ay) * (bx - ax));
                }
            }
            xs.sort_by(f32::total_cmp);
            for pair in xs.chunks_exact(2) {
                let a = pair[0].clamp(px0 as f32, px1 as f32) - px0 as f32;
                let b = pair[1].clamp(px0 as f32, px1 as f32) - px0 as f32;
                add_span(row, a, b, 1.0 / SUBROWS as f32);
            }
        }
        for (i, &c) in row.iter().enumerate() {
            if c > 1e-4 {
                emit((px0 + i) as u32, py as u32, c.min(1.0));
            }
        }
    }
}

/// Add `weight` times the horizontal overlap of [a, b) with every pixel of `row`.
fn add_span(row: &mut [f32], a: f32, b: f32, weight: f32) {
    if b <= a {
        return;
    }
    let ia = a.floor() as usize;
    let ib = b.floor() as usize;
    if ia == ib {
        if ia < row.len() {
            row[ia] += (b - a) * weight;
        }
        return;
    }
    row[ia] += (ia as f32 + 1.0 - a) * weight;
    let end = ib.min(row.len());
    for c in &mut row[ia + 1..end] {
        *c += weight;
    }
    if ib < row.len() {
        row[ib] += (b - ib as f32) * weight;
    }
}

/// The outline of `shape` placed in pixel coordinates: centre (cx, cy), longer side `s`.
pub fn place(shape: Shape, cx: f32, cy: f32, s: f32) -> Vec<[f32; 2]> {
    outline(shape).iter().map(|&[x, y]| [cx + x * s, cy + y * s]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outlines_are_unit_boxes() {
        for s in Shape::ALL {
            let (w, h) = aspect(s);
            assert!((w.max(h) - 1.0).abs() < 1e-5, "{s:?}: {w} x {h}");
        }
    }

    #[test]
    fn square_coverage_is_exact() {
        let poly = place(Shape::Square, 10.0, 10.0, 8.0); // covers [6, 14) exactly
        let mut total = 0.0;
        let mut row = Vec::new();
        rasterize(&poly, 32, 32, &mut row, |x, y, c| {
            assert!((6..14).contains(&x) && (6..14).contains(&y));
            assert!((c - 1.0).abs() < 1e-5);
            total += c;
        });
        assert!((total - 64.0).abs() < 1e-3);
    }
}
