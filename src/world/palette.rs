//! The colours of the world: eleven named object colours, each ONE exact RGB value, and the
//! background tints that are never object colours.
//!
//! The object palette is GenEval's ten colours plus gray. Values are chosen far apart in RGB
//! (closest pair: orange/yellow at ~95) so that a nearest-colour classifier is exact on
//! rendered images and tolerant of JPEG and blur. Tints are pastel or dark variants used only
//! for gradient and pattern backgrounds; each is at least ~68 away from every object colour,
//! so the judge can tell "background" from "object" by colour alone.

use serde::{Deserialize, Serialize};

/// A named object colour. Serialized as its lowercase English name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Orange,
    Yellow,
    Green,
    Blue,
    Purple,
    Pink,
    Brown,
    Black,
    White,
    Gray,
}

impl Color {
    pub const ALL: [Color; 11] = [
        Color::Red,
        Color::Orange,
        Color::Yellow,
        Color::Green,
        Color::Blue,
        Color::Purple,
        Color::Pink,
        Color::Brown,
        Color::Black,
        Color::White,
        Color::Gray,
    ];

    /// The exact sRGB value the renderer paints.
    pub const fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 20, 30],
            Color::Orange => [255, 130, 0],
            Color::Yellow => [255, 225, 0],
            Color::Green => [20, 160, 40],
            Color::Blue => [20, 60, 220],
            Color::Purple => [140, 40, 190],
            Color::Pink => [255, 110, 190],
            Color::Brown => [115, 65, 20],
            Color::Black => [10, 10, 10],
            Color::White => [255, 255, 255],
            Color::Gray => [128, 128, 128],
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Orange => "orange",
            Color::Yellow => "yellow",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Purple => "purple",
            Color::Pink => "pink",
            Color::Brown => "brown",
            Color::Black => "black",
            Color::White => "white",
            Color::Gray => "gray",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Black or white, whichever reads best on this colour (used for sign text).
    pub fn ink(self) -> Color {
        let [r, g, b] = self.rgb();
        let luma = 0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32;
        if luma > 150.0 { Color::Black } else { Color::White }
    }
}

/// A background-only colour. Never used for objects, signs or text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tint {
    Sky,
    Mint,
    Cream,
    Lavender,
    Peach,
    Navy,
    Teal,
    Forest,
    Plum,
    Slate,
}

impl Tint {
    pub const LIGHT: [Tint; 5] = [Tint::Sky, Tint::Mint, Tint::Cream, Tint::Lavender, Tint::Peach];
    pub const DARK: [Tint; 5] = [Tint::Navy, Tint::Teal, Tint::Forest, Tint::Plum, Tint::Slate];
    pub const ALL: [Tint; 10] = [
        Tint::Sky,
        Tint::Mint,
        Tint::Cream,
        Tint::Lavender,
        Tint::Peach,
        Tint::Navy,
        Tint::Teal,
        Tint::Forest,
        Tint::Plum,
        Tint::Slate,
    ];

    pub const fn rgb(self) -> [u8; 3] {
        match self {
            Tint::Sky => [175, 215, 240],
            Tint::Mint => [180, 235, 200],
            Tint::Cream => [245, 235, 190],
            Tint::Lavender => [215, 200, 240],
            Tint::Peach => [250, 210, 185],
            Tint::Navy => [20, 30, 80],
            Tint::Teal => [10, 90, 90],
            Tint::Forest => [20, 70, 40],
            Tint::Plum => [80, 25, 70],
            Tint::Slate => [60, 70, 90],
        }
    }

    /// The English phrase used in captions ("light blue", "dark green", ...).
    pub const fn phrase(self) -> &'static str {
        match self {
            Tint::Sky => "light blue",
            Tint::Mint => "mint green",
            Tint::Cream => "cream",
            Tint::Lavender => "lavender",
            Tint::Peach => "peach",
            Tint::Navy => "navy",
            Tint::Teal => "dark teal",
            Tint::Forest => "dark green",
            Tint::Plum => "plum",
            Tint::Slate => "slate",
        }
    }

    pub fn is_light(self) -> bool {
        Tint::LIGHT.contains(&self)
    }
}

/// Squared Euclidean distance in RGB.
pub fn dist2(a: [u8; 3], b: [u8; 3]) -> u32 {
    let d = |i: usize| (a[i] as i32 - b[i] as i32).pow(2) as u32;
    d(0) + d(1) + d(2)
}

/// Euclidean distance in RGB.
pub fn dist(a: [u8; 3], b: [u8; 3]) -> f32 {
    (dist2(a, b) as f32).sqrt()
}

/// Minimum RGB distance between an object colour and a background colour for them to count as
/// contrasting. Excludes orange on yellow (95) and white on cream (69), for example.
pub const CONTRAST: f32 = 100.0;

/// Minimum distance between an object colour and a tint it may be shown on.
pub const TINT_CONTRAST: f32 = 90.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_is_well_separated() {
        for (i, a) in Color::ALL.iter().enumerate() {
            for b in &Color::ALL[i + 1..] {
                assert!(dist(a.rgb(), b.rgb()) > 90.0, "{a:?} vs {b:?}");
            }
            for t in Tint::ALL {
                assert!(dist(a.rgb(), t.rgb()) > 65.0, "{a:?} vs {t:?}");
            }
        }
    }
}
