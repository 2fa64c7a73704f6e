//! Reading a sign: template matching against the world's own 5x7 font.
//!
//! Every glyph spans the full 5x7 box, so the ink's bounding box is exactly `(6n - 1) x 7` font
//! pixels: its height gives the scale and its width the letter count. Each letter's 35 cells are
//! sampled (4 bilinear samples of the soft ink value per cell) and compared with every glyph;
//! the closest wins. The ink value is the pixel's projection on the line from the sign colour
//! to the ink colour, so it degrades gracefully under blur and JPEG.

use image::RgbImage;

use crate::world::font::{self, ADVANCE, GLYPH_H, GLYPH_W};
use crate::world::palette::{self, Color};

use super::shape::blur;

/// Read the word on the sign whose region has bounding box `bbox` and colour `sign`.
pub fn read(img: &RgbImage, bbox: [u32; 4], sign: Color) -> Option<String> {
    let (w, h) = img.dimensions();
    // Skip the sign's edge, where it blends with the background.
    let inset = ((w.min(h) as f32 / 64.0).ceil() as u32).max(1);
    let [x0, y0, x1, y1] = [bbox[0] + inset, bbox[1] + inset, bbox[2].saturating_sub(inset), bbox[3].saturating_sub(inset)];
    if x1 < x0 + 5 || y1 < y0 + 5 {
        return None;
    }
    let (gw, gh) = ((x1 - x0) as usize, (y1 - y0) as usize);
    let px = |x: usize, y: usize| img.get_pixel(x0 + x as u32, y0 + y as u32).0;
    let pixels: Vec<[u8; 3]> = (0..gh).flat_map(|y| (0..gw).map(move |x| (x, y))).map(|(x, y)| px(x, y)).collect();

    // Measured sign and ink colours (generated images are never exactly on the palette).
    let near: Vec<&[u8; 3]> = pixels.iter().filter(|p| palette::dist(**p, sign.rgb()) < 80.0).collect();
    let s = mean(&near)?;
    let dmax = pixels.iter().map(|p| dist_f(p, &s)).fold(0.0, f32::max);
    if dmax < 60.0 {
        return None;
    }
    // The ink is black or white, as in the world: whichever is nearer the pixels farthest from
    // the sign. Using the palette value rather than a measured one keeps blur tails below 1/2.
    let far: Vec<&[u8; 3]> = pixels.iter().filter(|p| dist_f(p, &s) > 0.6 * dmax).collect();
    let measured = mean(&far)?;
    let k = [Color::Black, Color::White]
        .map(|c| c.rgb().map(|v| v as f32))
        .into_iter()
        .min_by(|a, b| dist_ff(a, &measured).total_cmp(&dist_ff(b, &measured)))?;
    let dir = [k[0] - s[0], k[1] - s[1], k[2] - s[2]];
    let norm = dir.iter().map(|d| d * d).sum::<f32>();
    let ink: Vec<f32> = pixels
        .iter()
        .map(|p| {
            let t = (0..3).map(|c| (p[c] as f32 - s[c]) * dir[c]).sum::<f32>() / norm;
            t.clamp(0.0, 1.0)
        })
        .collect();

    // The ink's bounding box.
    let on = |x: usize, y: usize| ink[y * gw + x] > 0.5;
    let rows: Vec<usize> = (0..gh).filter(|&y| (0..gw).any(|x| on(x, y))).collect();
    let cols: Vec<usize> = (0..gw).filter(|&x| (0..gh).any(|y| on(x, y))).collect();
    let (ty0, ty1) = (*rows.first()? as f32, *rows.last()? as f32 + 1.0);
    let (tx0, tx1) = (*cols.first()? as f32, *cols.last()? as f32 + 1.0);
    let (text_w, text_h) = (tx1 - tx0, ty1 - ty0);
    if text_h < GLYPH_H as f32 * 0.8 {
        return None;
    }
    // The letter count whose implied letter width best agrees with the height.
    let sy = text_h / GLYPH_H as f32;
    let n = (1..=16usize)
        .min_by(|&a, &b| {
            let err = |n: usize| (text_w / (ADVANCE * n - 1) as f32 - sy).abs();
            err(a).total_cmp(&err(b))
        })
        .unwrap_or(1);
    let sx = text_w / (ADVANCE * n - 1) as f32;

    // Bilinear sample of the ink value at continuous image coordinates (pixel centres at +0.5).
    let sample = |u: f32, v: f32| -> f32 {
        let (u, v) = ((u - 0.5).clamp(0.0, (gw - 1) as f32), (v - 0.5).clamp(0.0, (gh - 1) as f32));
        let (iu, iv) = (u.floor() as usize, v.floor() as usize);
        let (fu, fv) = (u - iu as f32, v - iv as f32);
        let (iu1, iv1) = ((iu + 1).min(gw - 1), (iv + 1).min(gh - 1));
        let a = ink[iv * gw + iu] * (1.0 - fu) + ink[iv * gw + iu1] * fu;
        let b = ink[iv1 * gw + iu] * (1.0 - fu) + ink[iv1 * gw + iu1] * fu;
        a * (1.0 - fv) + b * fv
    };
    // The observed letters: 4 samples per font cell.
    const SUB: [(f32, f32); 4] = [(0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7)];
    let observed: Vec<[f32; GLYPH_W * GLYPH_H]> = (0..n)
        .map(|i| {
            let mut cells = [0.0f32; GLYPH_W * GLYPH_H];
            for r in 0..GLYPH_H {
                for c in 0..GLYPH_W {
                    let acc: f32 = SUB
                        .iter()
                        .map(|(fx, fy)| sample(tx0 + ((ADVANCE * i + c) as f32 + fx) * sx, ty0 + (r as f32 + fy) * sy))
                        .sum();
                    cells[r * GLYPH_W + c] = acc / 4.0;
                }
            }
            cells
        })
        .collect();
    // Compare with every glyph rendered at the same scale and blurred as the image may be; the
    // blur that explains the whole word best wins. (Blur turns a lone diagonal cell, as in R,
    // into about 0.4, so unblurred templates would read R as P.)
    let mut best: Option<(f32, String)> = None;
    for sigma in [0.0, 0.8, 1.3, 1.8] {
        let templates = glyph_templates(sx, sy, sigma, &SUB);
        let mut cost = 0.0;
        let mut word = String::with_capacity(n);
        for cells in &observed {
            let (ch, d) = templates
                .iter()
                .map(|(ch, t)| (*ch, cells.iter().zip(t).map(|(v, t)| (v - t) * (v - t)).sum::<f32>()))
                .min_by(|a, b| a.1.total_cmp(&b.1))?;
            cost += d;
            word.push(ch);
        }
        if best.as_ref().is_none_or(|b| cost < b.0) {
            best = Some((cost, word));
        }
    }
    best.map(|b| b.1)
}

/// Every glyph rendered with `sx` x `sy` px cells, blurred by `sigma` px, sampled like the
/// observation.
fn glyph_templates(sx: f32, sy: f32, sigma: f32, sub: &[(f32, f32)]) -> Vec<(char, [f32; GLYPH_W * GLYPH_H])> {
    let m = (3.0 * sigma).ceil() as usize + 1;
    let (w, h) = ((GLYPH_W as f32 * sx).ceil() as usize + 2 * m, (GLYPH_H as f32 * sy).ceil() as usize + 2 * m);
    let overlap = |a0: f32, a1: f32, b0: f32, b1: f32| (a1.min(b1) - a0.max(b0)).max(0.0);
    let mut grid = vec![0.0f32; w * h];
    let mut tmp = Vec::new();
    font::glyphs()
        .map(|(ch, g)| {
            grid.iter_mut().for_each(|v| *v = 0.0);
            for r in 0..GLYPH_H {
                for c in 0..GLYPH_W {
                    if !font::ink(g, c, r) {
                        continue;
                    }
                    let (cx0, cy0) = (m as f32 + c as f32 * sx, m as f32 + r as f32 * sy);
                    for y in cy0.floor() as usize..((cy0 + sy).ceil() as usize).min(h) {
                        let oy = overlap(y as f32, y as f32 + 1.0, cy0, cy0 + sy);
                        for x in cx0.floor() as usize..((cx0 + sx).ceil() as usize).min(w) {
                            grid[y * w + x] += oy * overlap(x as f32, x as f32 + 1.0, cx0, cx0 + sx);
                        }
                    }
                }
            }
            if sigma > 0.0 {
                blur(&mut grid, &mut tmp, w, h, sigma);
            }
            let at = |u: f32, v: f32| -> f32 {
                let (u, v) = ((u - 0.5).clamp(0.0, (w - 1) as f32), (v - 0.5).clamp(0.0, (h - 1) as f32));
                let (iu, iv) = (u.floor() as usize, v.floor() as usize);
                let (fu, fv) = (u - iu as f32, v - iv as f32);
                let (iu1, iv1) = ((iu + 1).min(w - 1), (iv + 1).min(h - 1));
                let a = grid[iv * w + iu] * (1.0 - fu) + grid[iv * w + iu1] * fu;
                let b = grid[iv1 * w + iu] * (1.0 - fu) + grid[iv1 * w + iu1] * fu;
                a * (1.0 - fv) + b * fv
            };
            let mut cells = [0.0f32; GLYPH_W * GLYPH_H];
            for r in 0..GLYPH_H {
                for c in 0..GLYPH_W {
                    let acc: f32 = sub
                        .iter()
                        .map(|(fx, fy)| at(m as f32 + (c as f32 + fx) * sx, m as f32 + (r as f32 + fy) * sy))
                        .sum();
                    cells[r * GLYPH_W + c] = acc / sub.len() as f32;
                }
            }
            (ch, cells)
        })
        .collect()
}

fn mean(pixels: &[&[u8; 3]]) -> Option<[f32; 3]> {
    if pixels.is_empty() {
        return None;
    }
    let mut acc = [0.0f32; 3];
    for p in pixels {
        for c in 0..3 {
            acc[c] += p[c] as f32;
        }
    }
    Some(acc.map(|a| a / pixels.len() as f32))
}

fn dist_ff(p: &[f32; 3], s: &[f32; 3]) -> f32 {
    (0..3).map(|c| (p[c] - s[c]).powi(2)).sum::<f32>().sqrt()
}

fn dist_f(p: &[u8; 3], s: &[f32; 3]) -> f32 {
    (0..3).map(|c| (p[c] as f32 - s[c]).powi(2)).sum::<f32>().sqrt()
}
