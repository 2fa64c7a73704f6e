//! Natural-English phrases for scenes and edits. Every phrase builder returns the words together
//! with the claim they make, so a caption never says more (or less) than its spec.

use rand::Rng as _;

use super::palette::Color;
use super::sampler::{Rng, pick};
use super::spec::{Background, Cell, ObjectClaim, Object, Rel, Shape, Size};

pub(crate) fn shape_word(rng: &mut Rng, shape: Shape, plural: bool) -> &'static str {
    match (shape, plural) {
        (Shape::Diamond, false) => pick(rng, &["diamond", "diamond", "diamond", "rhombus"]),
        (Shape::Diamond, true) => pick(rng, &["diamonds", "diamonds", "diamonds", "rhombuses"]),
        (Shape::Cross, false) => pick(rng, &["cross", "cross", "plus sign"]),
        (Shape::Cross, true) => pick(rng, &["crosses", "crosses", "plus signs"]),
        (Shape::Circle, false) => "circle",
        (Shape::Circle, true) => "circles",
        (Shape::Square, false) => "square",
        (Shape::Square, true) => "squares",
        (Shape::Triangle, false) => "triangle",
        (Shape::Triangle, true) => "triangles",
        (Shape::Star, false) => "star",
        (Shape::Star, true) => "stars",
        (Shape::Heart, false) => "heart",
        (Shape::Heart, true) => "hearts",
        (Shape::Hexagon, false) => "hexagon",
        (Shape::Hexagon, true) => "hexagons",
    }
}

pub(crate) fn color_word(rng: &mut Rng, color: Color) -> &'static str {
    match color {
        Color::Gray => pick(rng, &["gray", "gray", "grey"]),
        Color::Purple => pick(rng, &["purple", "purple", "purple", "violet"]),
        c => c.name(),
    }
}

pub(crate) fn size_word(rng: &mut Rng, size: Size) -> &'static str {
    match size {
        Size::Small => pick(rng, &["small", "small", "little"]),
        Size::Medium => pick(rng, &["medium", "medium-sized"]),
        Size::Large => pick(rng, &["large", "big"]),
    }
}

/// "a" or "an" for the word that follows.
pub(crate) fn article(next: &str) -> &'static str {
    match next.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

pub(crate) fn number_word(rng: &mut Rng, n: u32) -> String {
    const WORDS: [&str; 7] = ["zero", "one", "two", "three", "four", "five", "six"];
    if (n as usize) < WORDS.len() && rng.random_bool(0.6) { WORDS[n as usize].to_string() } else { n.to_string() }
}

/// Where a cell is, as a prepositional phrase: "in the top left", "at the bottom", ...
pub(crate) fn cell_phrase(rng: &mut Rng, cell: Cell) -> String {
    match cell {
        Cell::Center => pick(rng, &["in the center", "in the middle", "in the centre"]).to_string(),
        Cell::Top => pick(rng, &["at the top", "at the top center", "in the top middle"]).to_string(),
        Cell::Bottom => pick(rng, &["at the bottom", "at the bottom center", "in the bottom middle"]).to_string(),
        Cell::Left => pick(rng, &["on the left", "at the left", "on the left side"]).to_string(),
        Cell::Right => pick(rng, &["on the right", "at the right", "on the right side"]).to_string(),
        corner => {
            let p = corner.phrase();
            match rng.random_range(0..3) {
                0 => format!("in the {p}"),
                1 => format!("in the {p} corner"),
                _ => format!("at the {p}"),
            }
        }
    }
}

pub(crate) fn relation_phrase(rng: &mut Rng, rel: Rel) -> &'static str {
    match rel {
        Rel::LeftOf => pick(rng, &["to the left of", "left of", "on the left of"]),
        Rel::RightOf => pick(rng, &["to the right of", "right of", "on the right of"]),
        Rel::Above => pick(rng, &["above", "over"]),
        Rel::Below => pick(rng, &["below", "under", "beneath"]),
    }
}

/// A phrase for the background, and the colour it claims (plain backgrounds only).
pub(crate) fn background_phrase(rng: &mut Rng, bg: &Background) -> (String, Option<Color>) {
    match bg {
        Background::Plain { color } => {
            let c = color_word(rng, *color);
            let s = match rng.random_range(0..4) {
                0 => format!("on a {c} background"),
                1 => format!("against a {c} background"),
                2 => format!("with a {c} background"),
                _ => format!("on {c}"),
            };
            (s, Some(*color))
        }
        Background::Gradient { from, to, .. } => {
            let s = if rng.random_bool(0.5) {
                format!("on a {} to {} gradient", from.phrase(), to.phrase())
            } else {
                pick(rng, &["on a gradient background", "over a soft gradient", "on a smooth gradient"]).to_string()
            };
            (s, None)
        }
        Background::Stripes { a, b, .. } => {
            let s = if rng.random_bool(0.4) {
                format!("on {} and {} stripes", a.phrase(), b.phrase())
            } else {
                pick(rng, &["on a striped background", "against stripes", "on a background of stripes"]).to_string()
            };
            (s, None)
        }
        Background::Checkerboard { .. } => {
            let s = pick(rng, &["on a checkered background", "on a checkerboard", "on a checkerboard pattern"]);
            (s.to_string(), None)
        }
        Background::Dots { .. } => {
            let s = pick(rng, &["on a polka-dot background", "on a dotted background", "against a pattern of dots"]);
            (s.to_string(), None)
        }
    }
}

/// Which attributes of an object a noun phrase names.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Mention {
    pub color: bool,
    pub size: bool,
    pub cell: bool,
}

/// A noun phrase for one object ("a small red circle in the top left") and its claim.
pub(crate) fn noun_phrase(rng: &mut Rng, obj: &Object, m: Mention) -> (String, ObjectClaim) {
    let mut words: Vec<String> = Vec::new();
    if m.size {
        words.push(size_word(rng, obj.size).to_string());
    }
    // "a circle that is red" / "a red circle"
    let postfix_color = m.color && !m.size && rng.random_bool(0.12);
    if m.color && !postfix_color {
        words.push(color_word(rng, obj.color).to_string());
    }
    words.push(shape_word(rng, obj.shape, false).to_string());
    let body = words.join(" ");
    let mut s = format!("{} {}", article(&body), body);
    if postfix_color {
        let c = color_word(rng, obj.color);
        s = match rng.random_range(0..3) {
            0 => format!("{s} that is {c}"),
            1 => format!("{s} colored {c}"),
            _ => format!("{s} in {c}"),
        };
    }
    if m.cell {
        s = format!("{s} {}", cell_phrase(rng, obj.cell()));
    }
    let claim = ObjectClaim {
        shape: obj.shape,
        color: m.color.then_some(obj.color),
        size: m.size.then_some(obj.size),
        cell: m.cell.then_some(obj.cell()),
        count: None,
    };
    (s, claim)
}

/// A short reference to an object already in the scene: "the circle" or "the red circle".
pub(crate) fn reference(rng: &mut Rng, obj: &Object, others: &[Object]) -> String {
    let unique_shape = others.iter().filter(|o| o.shape == obj.shape).count() <= 1;
    let shape = shape_word(rng, obj.shape, false);
    if unique_shape && rng.random_bool(0.6) {
        format!("the {shape}")
    } else {
        format!("the {} {shape}", color_word(rng, obj.color))
    }
}

/// What kind of phrase a caption's content is, which decides the frames it can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phrase {
    /// "a red circle", "a circle and a square"
    Singular,
    /// "three red stars"
    Plural,
    /// "the circle is left of a square", "there are three stars"
    Clause,
}

/// Wrap the content of a caption in one of many frames, optionally with a background phrase.
pub(crate) fn frame(rng: &mut Rng, content: &str, bg: Option<&str>, kind: Phrase) -> String {
    if kind == Phrase::Clause {
        let body = match bg {
            Some(b) => format!("{content}, {b}"),
            None => content.to_string(),
        };
        return match rng.random_range(0..8) {
            0 => format!("an image where {body}"),
            1 => format!("a picture in which {body}"),
            _ => body,
        };
    }
    let body = match bg {
        Some(b) if rng.random_bool(0.15) => {
            return match rng.random_range(0..2) {
                0 => format!("{b}, {content}"),
                _ => format!("draw {content} {b}"),
            };
        }
        Some(b) => format!("{content} {b}"),
        None => content.to_string(),
    };
    let there = if kind == Phrase::Plural { "there are" } else { "there is" };
    match rng.random_range(0..20) {
        0..=7 => body,
        8 | 9 => format!("draw {body}"),
        10 => format!("please draw {body}"),
        11 => format!("a picture of {body}"),
        12 => format!("an image of {body}"),
        13 => format!("a drawing of {body}"),
        14 => format!("a simple illustration of {body}"),
        15 => format!("show {body}"),
        16 => format!("generate {body}"),
        17 => format!("make {body}"),
        18 => format!("{there} {body}"),
        _ => format!("an image showing {body}"),
    }
}
