//! The embedded 5x7 bitmap font (A-Z, 0-9) used for signs, and by the judge to read them.
//!
//! Each glyph is 7 rows of 5 bits (bit 4 = leftmost column). Every glyph spans all 7 rows and
//! all 5 columns, so a word's ink box is exactly `(6n - 1) x 7` font pixels: it gives the scale
//! and the letter count. Glyphs that look alike in most fonts (O/0/D/Q, I/1/T, B/8, S/5,
//! Z/2) are drawn to differ in at least 3 cells, so template matching survives blur.

/// Glyph width and height in font pixels, and the advance (width + 1 blank column).
pub const GLYPH_W: usize = 5;
pub const GLYPH_H: usize = 7;
pub const ADVANCE: usize = 6;

/// The characters the font has, in `GLYPHS` order.
pub const CHARSET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

#[rustfmt::skip]
const GLYPHS: [[u8; 7]; 36] = [
    [0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001], // A
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110], // B
    [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110], // C
    [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100], // D
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111], // E
    [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000], // F
    [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111], // G
    [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001], // H
    [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b11111], // I
    [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100], // J
    [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001], // K
    [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111], // L
    [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001], // M
    [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001], // N
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110], // O
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000], // P
    [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101], // Q
    [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001], // R
    [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110], // S
    [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100], // T
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110], // U
    [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100], // V
    [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010], // W
    [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001], // X
    [0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100, 0b00100], // Y
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111], // Z
    [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110], // 0
    [0b00100, 0b01100, 0b10100, 0b00100, 0b00100, 0b00100, 0b11111], // 1
    [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111], // 2
    [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110], // 3
    [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010], // 4
    [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110], // 5
    [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110], // 6
    [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000], // 7
    [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110], // 8
    [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100], // 9
];

/// The glyph of `c` (case-insensitive), or `None` if the font lacks it.
pub fn glyph(c: char) -> Option<&'static [u8; 7]> {
    let c = c.to_ascii_uppercase();
    CHARSET.find(c).map(|i| &GLYPHS[i])
}

/// Whether font cell (col, row) of `g` is ink.
pub fn ink(g: &[u8; 7], col: usize, row: usize) -> bool {
    (g[row] >> (GLYPH_W - 1 - col)) & 1 == 1
}

/// All glyphs with their characters, for template matching.
pub fn glyphs() -> impl Iterator<Item = (char, &'static [u8; 7])> {
    CHARSET.chars().zip(GLYPHS.iter())
}

/// Whether every character of `word` is in the font.
pub fn supports(word: &str) -> bool {
    !word.is_empty() && word.chars().all(|c| glyph(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hamming(a: &[u8; 7], b: &[u8; 7]) -> u32 {
        a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
    }

    #[test]
    fn glyphs_are_distinct_and_full_height() {
        let all: Vec<_> = glyphs().collect();
        for (i, (ca, ga)) in all.iter().enumerate() {
            assert!(ga[0] != 0 && ga[6] != 0, "{ca} does not span 7 rows");
            let cols = ga.iter().fold(0u8, |acc, r| acc | r);
            assert_eq!(cols, 0b11111, "{ca} does not span 5 columns");
            for (cb, gb) in &all[i + 1..] {
                assert!(hamming(ga, gb) >= 3, "{ca} and {cb} differ in {} cells", hamming(ga, gb));
            }
        }
    }
}
