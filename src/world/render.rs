//! The renderer: a `Scene` to an RGB image, deterministically, at any size.
//!
//! Interiors are flat (exactly the palette value); object edges are anti-aliased with exact
//! horizontal and 4x vertical coverage; signs and text are pixel-aligned rectangles.

use image::RgbImage;

use super::font::{self, ADVANCE, GLYPH_H};
use super::palette::Tint;
use super::shapes;
use super::spec::{Background, Direction, Object, Scene, Sign};

/// Render `scene` (a `Scene`, or a `Spec` whose scene it is) at `width` x `height`.
pub fn render(scene: &(impl AsRef<Scene> + ?Sized), width: u32, height: u32) -> RgbImage {
    let scene = scene.as_ref();
    let mut img = RgbImage::new(width, height);
    if width == 0 || height == 0 {
        return img;
    }
    paint_background(&mut img, &scene.background);
    let mut row = Vec::new();
    for obj in &scene.objects {
        paint_object(&mut img, obj, &mut row);
    }
    if let Some(sign) = &scene.sign {
        paint_sign(&mut img, sign);
    }
    img
}

/// The pixel geometry of an object: centre and longer side.
pub fn object_geometry(obj: &Object, width: u32, height: u32) -> (f32, f32, f32) {
    let s = obj.extent * width.min(height) as f64;
    ((obj.x * width as f64) as f32, (obj.y * height as f64) as f32, s as f32)
}

/// Pixel bounding box `[x0, y0, x1, y1]` of an object (x1, y1 exclusive, unclipped).
pub fn object_box(obj: &Object, width: u32, height: u32) -> [f32; 4] {
    let (cx, cy, s) = object_geometry(obj, width, height);
    let (aw, ah) = shapes::aspect(obj.shape);
    [cx - aw * s / 2.0, cy - ah * s / 2.0, cx + aw * s / 2.0, cy + ah * s / 2.0]
}

fn paint_object(img: &mut RgbImage, obj: &Object, row: &mut Vec<f32>) {
    let (w, h) = img.dimensions();
    let (cx, cy, s) = object_geometry(obj, w, h);
    let poly = shapes::place(obj.shape, cx, cy, s);
    let fg = obj.color.rgb();
    shapes::rasterize(&poly, w, h, row, |x, y, c| {
        let p = img.get_pixel_mut(x, y);
        for (v, f) in p.0.iter_mut().zip(fg) {
            let bg = *v as f32;
            *v = (bg + (f as f32 - bg) * c + 0.5) as u8;
        }
    });
}

fn lerp(a: [u8; 3], b: [u8; 3], t: f32) -> [u8; 3] {
    // `+ 0.5` then truncate: the same as `round()` for these non-negative values, and much faster.
    let l = |k: usize| (a[k] as f32 + (b[k] as f32 - a[k] as f32) * t + 0.5) as u8;
    [l(0), l(1), l(2)]
}

/// Fill every row from a function of (row index) -> row of colours, reusing identical rows.
fn fill_rows(img: &mut RgbImage, mut row_of: impl FnMut(u32, &mut [[u8; 3]])) {
    let (w, h) = img.dimensions();
    let mut row = vec![[0u8; 3]; w as usize];
    let buf: &mut [u8] = img;
    for (y, out) in buf.chunks_exact_mut(3 * w as usize).enumerate().take(h as usize) {
        row_of(y as u32, &mut row);
        for (o, c) in out.chunks_exact_mut(3).zip(&row) {
            o.copy_from_slice(c);
        }
    }
}

fn paint_background(img: &mut RgbImage, bg: &Background) {
    let (w, h) = img.dimensions();
    match *bg {
        Background::Plain { color } => {
            let c = color.rgb();
            fill_rows(img, |_, row| row.fill(c));
        }
        Background::Gradient { from, to, direction } => {
            let (a, b) = (from.rgb(), to.rgb());
            let (dw, dh) = ((w.max(2) - 1) as f32, (h.max(2) - 1) as f32);
            match direction {
                Direction::Horizontal => {
                    let cols: Vec<[u8; 3]> = (0..w).map(|x| lerp(a, b, x as f32 / dw)).collect();
                    fill_rows(img, |_, row| row.copy_from_slice(&cols));
                }
                Direction::Vertical => fill_rows(img, |y, row| row.fill(lerp(a, b, y as f32 / dh))),
                Direction::Diagonal => {
                    // The colour depends on x + y only.
                    let diag: Vec<[u8; 3]> = (0..w + h).map(|s| lerp(a, b, s as f32 / (dw + dh))).collect();
                    fill_rows(img, |y, row| row.copy_from_slice(&diag[y as usize..(y + w) as usize]));
                }
            }
        }
        Background::Stripes { a, b, period, vertical } => {
            let (a, b, p) = (a.rgb(), b.rgb(), period.max(1));
            let pick = |v: u32| if (v / p).is_multiple_of(2) { a } else { b };
            if vertical {
                let cols: Vec<[u8; 3]> = (0..w).map(pick).collect();
                fill_rows(img, |_, row| row.copy_from_slice(&cols));
            } else {
                fill_rows(img, |y, row| row.fill(pick(y)));
            }
        }
        Background::Checkerboard { a, b, period } => {
            let (a, b, p) = (a.rgb(), b.rgb(), period.max(1));
            fill_rows(img, |y, row| {
                for (x, c) in row.iter_mut().enumerate() {
                    *c = if (x as u32 / p + y / p).is_multiple_of(2) { a } else { b };
                }
            });
        }
        Background::Dots { base, dot, period } => paint_dots(img, base, dot, period.max(4)),
    }
}

/// One anti-aliased dot in the middle of every `period` x `period` block.
fn paint_dots(img: &mut RgbImage, base: Tint, dot: Tint, period: u32) {
    let (a, b) = (base.rgb(), dot.rgb());
    let r = period as f32 / 4.0;
    let half = period as f32 / 2.0;
    // One tile, repeated.
    let tile: Vec<[u8; 3]> = (0..period * period)
        .map(|i| {
            let dx = (i % period) as f32 + 0.5 - half;
            let dy = (i / period) as f32 + 0.5 - half;
            lerp(a, b, (r + 0.5 - (dx * dx + dy * dy).sqrt()).clamp(0.0, 1.0))
        })
        .collect();
    fill_rows(img, |y, row| {
        let t = &tile[((y % period) * period) as usize..((y % period + 1) * period) as usize];
        for (x, c) in row.iter_mut().enumerate() {
            *c = t[x % period as usize];
        }
    });
}

/// Where a sign goes and how big its letters are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignLayout {
    /// Image pixels per font pixel.
    pub scale: u32,
    /// Padding between the sign's edge and the text, in image pixels.
    pub pad: u32,
    pub x0: u32,
    pub y0: u32,
    pub w: u32,
    pub h: u32,
}

/// Size of a sign for a word of `len` letters: the largest integer letter scale such that the
/// sign fits in 80% of the width and 40% of the height, capped at 4 px per font pixel per 128 px
/// of image. At 128x128 that is 4 for 1-3 letters, 3 for 4-5, and 2 for 6.
pub fn sign_size(len: usize, width: u32, height: u32) -> (u32, u32, u32) {
    let len = len.max(1) as u32;
    let cap = ((4 * width.min(height)) as f32 / 128.0).round().max(1.0) as u32;
    let fits = |s: u32| ((6 * len + 3) * s) as f32 <= 0.8 * width as f32 && (11 * s) as f32 <= 0.4 * height as f32;
    let scale = (1..=cap).rev().find(|&s| fits(s)).unwrap_or(1);
    (scale, (6 * len + 3) * scale, 11 * scale)
}

/// The longest word (at most 6 letters) whose sign fits with letters at least 2 px per font
/// pixel, which the judge needs to read it: 6 from 98 px wide, 3 at 64.
pub fn max_word_len(width: u32, height: u32) -> usize {
    (1..=6).rev().find(|&n| ((6 * n + 3) * 2) as f32 <= 0.8 * width as f32 && 22.0 <= 0.4 * height as f32).unwrap_or(1)
}

/// The layout of `sign` in a `width` x `height` image: centred on (x, y), kept inside.
pub fn sign_layout(sign: &Sign, width: u32, height: u32) -> SignLayout {
    let (scale, w, h) = sign_size(sign.word.chars().count(), width, height);
    let place = |c: f64, size: u32, total: u32| -> u32 {
        let margin = (total / 64).max(1) as i64;
        let x0 = (c * total as f64 - size as f64 / 2.0).round() as i64;
        x0.clamp(margin.min(total as i64 - size as i64).max(0), (total as i64 - size as i64 - margin).max(0)) as u32
    };
    SignLayout { scale, pad: 2 * scale, x0: place(sign.x, w, width), y0: place(sign.y, h, height), w, h }
}

fn paint_sign(img: &mut RgbImage, sign: &Sign) {
    let (w, h) = img.dimensions();
    let l = sign_layout(sign, w, h);
    let bg = sign.color.rgb();
    let ink = sign.ink.rgb();
    for y in l.y0..(l.y0 + l.h).min(h) {
        for x in l.x0..(l.x0 + l.w).min(w) {
            img.put_pixel(x, y, image::Rgb(bg));
        }
    }
    for (i, c) in sign.word.chars().enumerate() {
        let Some(g) = font::glyph(c) else { continue };
        let gx = l.x0 + l.pad + (i * ADVANCE) as u32 * l.scale;
        for row in 0..GLYPH_H {
            for col in 0..font::GLYPH_W {
                if !font::ink(g, col, row) {
                    continue;
                }
                for dy in 0..l.scale {
                    for dx in 0..l.scale {
                        let (x, y) = (gx + col as u32 * l.scale + dx, l.y0 + l.pad + row as u32 * l.scale + dy);
                        if x < w && y < h {
                            img.put_pixel(x, y, image::Rgb(ink));
                        }
                    }
                }
            }
        }
    }
}
