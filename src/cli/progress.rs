//! Progress on stderr while tokens are sampled: an indicatif bar (tokens, tokens/s, ETA) and,
//! with `--preview`, the image so far drawn in the terminal after every finished token row.

use std::io::Write;

use base64::Engine;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use tessera::generate::{ImageJob, Progress};
use tessera::model::Model;

use super::common::show_progress;
use super::generate::OutputArgs;

pub struct Reporter<'a> {
    bar: Option<ProgressBar>,
    preview: Option<Preview<'a>>,
}

struct Preview<'a> {
    model: &'a Model,
    grid: (usize, usize),
    rows_shown: usize,
    lines_drawn: usize,
}

impl<'a> Reporter<'a> {
    pub fn new(model: &'a Model, jobs: &[ImageJob], opts: &OutputArgs) -> Self {
        let grid = jobs.first().map(|j| j.grid).unwrap_or((0, 0));
        let total = tessera::tokens::block_len(grid.0, grid.1) as u64;
        let bar = show_progress(opts.quiet).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} tokens  {per_sec}  ETA {eta}  {msg}")
                    .expect("static template"),
            );
            if jobs.len() > 1 {
                bar.set_message(format!("x{} images", jobs.len()));
            }
            bar
        });
        let preview = (opts.preview && !opts.quiet).then_some(Preview { model, grid, rows_shown: 0, lines_drawn: 0 });
        Self { bar, preview }
    }

    pub fn step(&mut self, p: &Progress) {
        if let Some(bar) = &self.bar {
            bar.set_position(p.step as u64);
        }
        if let Some(preview) = &mut self.preview
            && p.rows_done > preview.rows_shown {
                preview.rows_shown = p.rows_done;
                if let Some(bar) = &self.bar {
                    bar.suspend(|| preview.draw(p));
                } else {
                    preview.draw(p);
                }
            }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Preview<'_> {
    fn draw(&mut self, p: &Progress) {
        let (_, w) = self.grid;
        let rows = p.rows_done;
        let Some(codes) = p.codes.first() else { return };
        let Ok(mut imgs) = self.model.decode_codes(&[codes[..rows * w].to_vec()], rows, w) else { return };
        let img = imgs.swap_remove(0);
        let mut err = std::io::stderr().lock();
        if self.lines_drawn > 0 {
            let _ = write!(err, "\x1b[{}A", self.lines_drawn);
        }
        self.lines_drawn = match protocol() {
            Protocol::Kitty => draw_kitty(&mut err, &img),
            Protocol::Iterm => draw_iterm(&mut err, &img),
            Protocol::HalfBlocks => draw_half_blocks(&mut err, &img),
        };
        let _ = err.flush();
    }
}

enum Protocol {
    Kitty,
    Iterm,
    HalfBlocks,
}

fn protocol() -> Protocol {
    let term = std::env::var("TERM").unwrap_or_default();
    if std::env::var_os("KITTY_WINDOW_ID").is_some() || term.contains("kitty") {
        Protocol::Kitty
    } else if std::env::var("TERM_PROGRAM").is_ok_and(|t| t == "iTerm.app" || t == "WezTerm") {
        Protocol::Iterm
    } else {
        Protocol::HalfBlocks
    }
}

fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let _ = img.write_to(&mut buf, image::ImageFormat::Png);
    buf.into_inner()
}

/// Rows of terminal cells an inline image of `h` pixels occupies (about 16 px per line).
fn inline_lines(h: u32) -> usize {
    h.div_ceil(16) as usize + 1
}

fn draw_kitty(out: &mut impl Write, img: &RgbImage) -> usize {
    let data = base64::engine::general_purpose::STANDARD.encode(png_bytes(img));
    let chunks: Vec<&[u8]> = data.as_bytes().chunks(4096).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let more = u8::from(i + 1 < chunks.len());
        let head = if i == 0 { "a=T,f=100,".to_string() } else { String::new() };
        let _ = write!(out, "\x1b_G{head}m={more};{}\x1b\\", String::from_utf8_lossy(chunk));
    }
    let _ = writeln!(out);
    inline_lines(img.height())
}

fn draw_iterm(out: &mut impl Write, img: &RgbImage) -> usize {
    let data = base64::engine::general_purpose::STANDARD.encode(png_bytes(img));
    let _ = writeln!(out, "\x1b]1337;File=inline=1;preserveAspectRatio=1:{data}\x07");
    inline_lines(img.height())
}

/// Two pixels per cell: '▀' with the top pixel as foreground, the bottom as background.
fn draw_half_blocks(out: &mut impl Write, img: &RgbImage) -> usize {
    let max_cols = 64u32;
    let img = if img.width() > max_cols {
        let h = (img.height() * max_cols / img.width()).max(1);
        image::imageops::resize(img, max_cols, h, image::imageops::FilterType::Triangle)
    } else {
        img.clone()
    };
    let mut lines = 0;
    for y in (0..img.height()).step_by(2) {
        let mut line = String::new();
        for x in 0..img.width() {
            let t = img.get_pixel(x, y);
            let b = if y + 1 < img.height() { *img.get_pixel(x, y + 1) } else { image::Rgb([0, 0, 0]) };
            line.push_str(&format!("\x1b[38;2;{};{};{}m\x1b[48;2;{};{};{}m▀", t[0], t[1], t[2], b[0], b[1], b[2]));
        }
        let _ = writeln!(out, "{line}\x1b[0m\x1b[K");
        lines += 1;
    }
    lines
}
