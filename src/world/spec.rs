//! The structured description of a scene (what to draw) and of a prompt (what it claims).
//!
//! Positions and object extents are fractions of the image, so one spec renders at any size:
//! `x`, `y` are the centre of the object's bounding box as fractions of width and height, and
//! `extent` is the longer side of that box as a fraction of `min(width, height)`.

use serde::{Deserialize, Serialize};

use super::palette::{Color, Tint};

/// The object shapes. Every shape has a fixed orientation (the star and triangle point up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Heart,
    Diamond,
    Hexagon,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 8] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Heart,
        Shape::Diamond,
        Shape::Hexagon,
        Shape::Cross,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Heart => "heart",
            Shape::Diamond => "diamond",
            Shape::Hexagon => "hexagon",
            Shape::Cross => "cross",
        }
    }
}

/// Size classes. The extent ranges (fractions of `min(width, height)`) are, at 128 px:
/// small 20-22 px, medium 28-32 px, large 40-46 px.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Medium,
    Large,
}

impl Size {
    pub const ALL: [Size; 3] = [Size::Small, Size::Medium, Size::Large];

    /// The range of `extent` the sampler draws from.
    pub const fn extent_range(self) -> (f64, f64) {
        match self {
            Size::Small => (20.0 / 128.0, 22.0 / 128.0),
            Size::Medium => (28.0 / 128.0, 32.0 / 128.0),
            Size::Large => (40.0 / 128.0, 46.0 / 128.0),
        }
    }

    /// The size class of a measured extent (thresholds halfway between the ranges).
    pub fn classify(extent: f64) -> Size {
        if extent < 25.0 / 128.0 {
            Size::Small
        } else if extent < 36.0 / 128.0 {
            Size::Medium
        } else {
            Size::Large
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
        }
    }

    pub fn bigger(self) -> Option<Size> {
        match self {
            Size::Small => Some(Size::Medium),
            Size::Medium => Some(Size::Large),
            Size::Large => None,
        }
    }

    pub fn smaller(self) -> Option<Size> {
        match self {
            Size::Small => None,
            Size::Medium => Some(Size::Small),
            Size::Large => Some(Size::Medium),
        }
    }
}

/// A cell of the 3x3 layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cell {
    TopLeft,
    Top,
    TopRight,
    Left,
    Center,
    Right,
    BottomLeft,
    Bottom,
    BottomRight,
}

impl Cell {
    pub const ALL: [Cell; 9] = [
        Cell::TopLeft,
        Cell::Top,
        Cell::TopRight,
        Cell::Left,
        Cell::Center,
        Cell::Right,
        Cell::BottomLeft,
        Cell::Bottom,
        Cell::BottomRight,
    ];

    pub fn from_col_row(col: usize, row: usize) -> Cell {
        Cell::ALL[row.min(2) * 3 + col.min(2)]
    }

    pub fn col(self) -> usize {
        self as usize % 3
    }

    pub fn row(self) -> usize {
        self as usize / 3
    }

    /// The cell containing a point given as fractions of width and height.
    pub fn of(x: f64, y: f64) -> Cell {
        let idx = |v: f64| ((v * 3.0).floor().clamp(0.0, 2.0)) as usize;
        Cell::from_col_row(idx(x), idx(y))
    }

    /// Centre of the cell, as fractions.
    pub fn center(self) -> (f64, f64) {
        ((self.col() as f64 + 0.5) / 3.0, (self.row() as f64 + 0.5) / 3.0)
    }

    /// "top left", "top", "center", ...
    pub const fn phrase(self) -> &'static str {
        match self {
            Cell::TopLeft => "top left",
            Cell::Top => "top",
            Cell::TopRight => "top right",
            Cell::Left => "left",
            Cell::Center => "center",
            Cell::Right => "right",
            Cell::BottomLeft => "bottom left",
            Cell::Bottom => "bottom",
            Cell::BottomRight => "bottom right",
        }
    }
}

/// Direction of a gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Horizontal,
    Vertical,
    Diagonal,
}

/// The background of a scene. Patterns have periods that are multiples of 8 px, aligned to the
/// 8-px grid (so they line up with the VQ-VAE's 8x8 patches).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Background {
    Plain { color: Color },
    Gradient { from: Tint, to: Tint, direction: Direction },
    Stripes { a: Tint, b: Tint, period: u32, vertical: bool },
    Checkerboard { a: Tint, b: Tint, period: u32 },
    Dots { base: Tint, dot: Tint, period: u32 },
}

impl Background {
    /// The plain palette colour, if this is a plain background.
    pub fn plain(&self) -> Option<Color> {
        match self {
            Background::Plain { color } => Some(*color),
            _ => None,
        }
    }

    /// The RGB values an object must contrast with.
    pub fn colors(&self) -> Vec<[u8; 3]> {
        match self {
            Background::Plain { color } => vec![color.rgb()],
            Background::Gradient { from: a, to: b, .. }
            | Background::Stripes { a, b, .. }
            | Background::Checkerboard { a, b, .. }
            | Background::Dots { base: a, dot: b, .. } => vec![a.rgb(), b.rgb()],
        }
    }
}

/// One object of a scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    /// Longer side of the bounding box, as a fraction of `min(width, height)`.
    pub extent: f64,
    /// Centre of the bounding box, as fractions of width and height.
    pub x: f64,
    pub y: f64,
}

impl Object {
    pub fn cell(&self) -> Cell {
        Cell::of(self.x, self.y)
    }
}

/// A sign (or poster): a rectangle of `color` with `word` written on it in `ink`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sign {
    pub word: String,
    pub color: Color,
    pub ink: Color,
    /// Centre, as fractions of width and height (the renderer keeps the sign inside the image).
    pub x: f64,
    pub y: f64,
}

/// Everything needed to render an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: Background,
    #[serde(default)]
    pub objects: Vec<Object>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign: Option<Sign>,
}

/// Spatial relation between two claimed objects, judged from bounding-box centres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rel {
    LeftOf,
    RightOf,
    Above,
    Below,
}

/// A claim about one object (or, with `count`, about a group of identical objects). Attributes
/// left out are not claimed and not checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectClaim {
    pub shape: Shape,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<Color>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Size>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<Cell>,
    /// Exactly this many objects match the claim (counting prompts). `None`: at least one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// `objects[subject]` is `relation` `objects[object]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relation {
    pub subject: usize,
    pub relation: Rel,
    pub object: usize,
}

/// The text a prompt asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextClaim {
    pub word: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<Color>,
}

/// What a caption claims; the judge checks exactly these.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<ObjectClaim>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relations: Vec<Relation>,
    /// A plain background colour named by the caption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<Color>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextClaim>,
}

/// The kinds of edit instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EditKind {
    Recolor,
    Remove,
    Add,
    Move,
    Resize,
    Background,
    Text,
}

impl EditKind {
    pub const ALL: [EditKind; 7] = [
        EditKind::Recolor,
        EditKind::Remove,
        EditKind::Add,
        EditKind::Move,
        EditKind::Resize,
        EditKind::Background,
        EditKind::Text,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            EditKind::Recolor => "recolor",
            EditKind::Remove => "remove",
            EditKind::Add => "add",
            EditKind::Move => "move",
            EditKind::Resize => "resize",
            EditKind::Background => "background",
            EditKind::Text => "text",
        }
    }
}

/// What an edit changes and what it keeps. The target scene is the `Spec`'s scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditSpec {
    pub kind: EditKind,
    /// Index into the target's objects of the object the instruction changes or adds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<usize>,
    /// Index into the source's objects of the object the instruction removes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<usize>,
    /// What the instruction says about the changed object; attributes it leaves out are free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ObjectClaim>,
    /// Indices into the target's objects of the objects that must be exactly as in the source.
    pub keep: Vec<usize>,
    /// The background must stay as in the source.
    pub keep_background: bool,
    /// The sign (if any) must stay as in the source.
    pub keep_sign: bool,
}

/// A scene plus what its prompt claims (and, for edits, what the edit changes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    #[serde(flatten)]
    pub scene: Scene,
    #[serde(default)]
    pub claims: Claims,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<EditSpec>,
}

impl AsRef<Scene> for Scene {
    fn as_ref(&self) -> &Scene {
        self
    }
}

impl AsRef<Scene> for Spec {
    fn as_ref(&self) -> &Scene {
        &self.scene
    }
}
