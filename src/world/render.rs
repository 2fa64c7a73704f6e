//! The renderer: a `Scene` to an RGB image, deterministically, at any size.
//!
//! Interiors are flat (exactly the palette value); object edges are anti-aliased with exact
//! horizontal and 4x vertical coverage; signs and text are pixel-aligned rectangles.

use image::RgbImage;

use super::font::{self, ADVANCE, GLYPH_H};
use super::palette::Tint;
use super::shapes;
use super::spec::{Background, Direction, Object, Scene, Sign};

/// Render `scene` at `width` x `height`.
pub fn render(scene: &Scene, width: u32, height: u32) -> RgbImage {
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
        for k in 0..3 {
            let bg = p.0[k] as f32;
            p.0[k] = (bg + (fg[k] as f32 - bg) * c).round() as u8;
        }
    });
}

fn lerp(a: [u8; 3], b: [u8; 3], t: f32) -> [u8; 3] {
    let l = |k: usize| (a[k] as f32 + (b[k] as f32 - a[k] as f32) * t).round() as u8;
    [l(0), l(1), l(2)]
}

fn paint_background(img: &mut RgbImage, bg: &Background) {
    let (w, h) = img.dimensions();
    let fill = |img: &mut RgbImage, f: &dyn Fn(u32, u32) -> [u8; 3]| {
        for (x, y, p) in img.enumerate_pixels_mut() {
            p.0 = f(x, y);
        }
    };
    match *bg {
        Background::Plain { color } => {
            let c = color.rgb();
            fill(img, &|_, _| c);
        }
        Background::Gradient { from, to, direction } => {
            let (a, b) = (from.rgb(), to.rgb());
            let (dw, dh) = ((w.max(2) - 1) as f32, (h.max(2) - 1) as f32);
            // Rows (or columns) share a colour for the straight gradients; compute them once.
            match direction {
                Direction::Horizontal => {
                    let cols: Vec<[u8; 3]> = (0..w).map(|x| lerp(a, b, x as f32 / dw)).collect();
                    fill(img, &|x, _| cols[x as usize]);
                }
                Direction::Vertical => {
                    let rows: Vec<[u8; 3]> = (0..h).map(|y| lerp(a, b, y as f32 / dh)).collect();
                    fill(img, &|_, y| rows[y as usize]);
                }
                Direction::Diagonal => fill(img, &|x, y| lerp(a, b, (x + y) as f32 / (dw + dh))),
            }
        }
        Background::Stripes { a, b, period, vertical } => {
            let (a, b, p) = (a.rgb(), b.rgb(), period.max(1));
            fill(img, &|x, y| if ((if vertical { x } else { y }) / p) % 2 == 0 { a } else { b });
        }
        Background::Checkerboard { a, b, period } => {
            let (a, b, p) = (a.rgb(), b.rgb(), period.max(1));
            fill(img, &|x, y| if (x / p + y / p) % 2 == 0 { a } else { b });
        }
        Background::Dots { base, dot, period } => paint_dots(img, base, dot, period.max(4)),
    }
}

/// One anti-aliased dot in the middle of every `period` x `period` block.
fn paint_dots(img: &mut RgbImage, base: Tint, dot: Tint, period: u32) {
    let (a, b) = (base.rgb(), dot.rgb());
    let r = period as f32 / 4.0;
    let half = period as f32 / 2.0;
    for (x, y, p) in img.enumerate_pixels_mut() {
        let dx = (x % period) as f32 + 0.5 - half;
        let dy = (y % period) as f32 + 0.5 - half;
        let d = (dx * dx + dy * dy).sqrt();
        p.0 = lerp(a, b, (r + 0.5 - d).clamp(0.0, 1.0));
    }
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
