//! The seeded scene sampler: one function per t2i category, each returning a scene, its caption
//! and the claims the caption makes.
//!
//! Placement is rejection sampling on bounding boxes: objects keep a gap of 4 px (at 128 px)
//! from each other and 3 px from the border, so they never overlap and never merge under blur.

use rand::Rng as _;
use rand::SeedableRng;

use super::Category;
use super::WorldError;
use super::caption::{self, Mention, Phrase};
use super::palette::{self, Color, Tint};
use super::render::{object_box, sign_layout};
use super::spec::{
    Background, Cell, Claims, Direction, Object, ObjectClaim, Rel, Relation, Scene, Shape, Sign, Size, TextClaim,
};

/// The random generator of the world. Seeded per sample, so output is independent of threads.
pub type Rng = rand_chacha::ChaCha8Rng;

/// The generator for sample `index` of a run seeded with `seed`.
pub fn sample_rng(seed: u64, index: u64) -> Rng {
    Rng::seed_from_u64(splitmix(seed ^ splitmix(index.wrapping_add(0x9e37_79b9))))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(crate) fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// Round to 4 decimals so that the JSON spec renders exactly like the in-memory one.
fn q(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

/// A scene with its prompt.
#[derive(Debug, Clone)]
pub struct Draft {
    pub scene: Scene,
    pub claims: Claims,
    pub caption: String,
}

/// Free space bookkeeping for rejection sampling.
pub(crate) struct Layout {
    pub w: u32,
    pub h: u32,
    boxes: Vec<[f32; 4]>,
}

impl Layout {
    pub fn new(w: u32, h: u32) -> Layout {
        Layout { w, h, boxes: Vec::new() }
    }

    fn unit(&self) -> f32 {
        self.w.min(self.h) as f32 / 128.0
    }

    /// Whether `b` is inside the image (with margin) and clear of every placed box (with gap).
    pub fn fits(&self, b: [f32; 4]) -> bool {
        let m = 2.9 * self.unit();
        let g = 4.0 * self.unit();
        if b[0] < m || b[1] < m || b[2] > self.w as f32 - m || b[3] > self.h as f32 - m {
            return false;
        }
        self.boxes.iter().all(|o| b[2] + g <= o[0] || o[2] + g <= b[0] || b[3] + g <= o[1] || o[3] + g <= b[1])
    }

    pub fn take(&mut self, b: [f32; 4]) {
        self.boxes.push(b);
    }

    /// Place an object centred near (x, y) (fractions), shifted inward to stay inside the image.
    pub fn object_at(&self, rng: &mut Rng, shape: Shape, color: Color, size: Size, x: f64, y: f64) -> Object {
        let (lo, hi) = size.extent_range();
        let extent = q(rng.random_range(lo..hi));
        let s = extent * self.w.min(self.h) as f64;
        let (aw, ah) = super::shapes::aspect(shape);
        let m = 3.0 * self.unit() as f64;
        let clampf = |v: f64, half: f64, total: u32| {
            let t = total as f64;
            (v * t).clamp(m + half, (t - m - half).max(m + half)) / t
        };
        Object {
            shape,
            color,
            size,
            extent,
            x: q(clampf(x, aw as f64 * s / 2.0, self.w)),
            y: q(clampf(y, ah as f64 * s / 2.0, self.h)),
        }
    }

    /// Place an object in `cell` with jitter; `None` if it does not fit.
    pub fn try_cell(&mut self, rng: &mut Rng, shape: Shape, color: Color, size: Size, cell: Cell) -> Option<Object> {
        for _ in 0..8 {
            let (cx, cy) = cell.center();
            let j = 0.18 / 3.0;
            let (dx, dy) = (rng.random_range(-j..j), rng.random_range(-j..j));
            let obj = self.object_at(rng, shape, color, size, cx + dx, cy + dy);
            let b = object_box(&obj, self.w, self.h);
            if obj.cell() == cell && self.fits(b) {
                self.take(b);
                return Some(obj);
            }
        }
        None
    }

    /// Place an object anywhere it fits; `None` after many tries.
    pub fn try_anywhere(&mut self, rng: &mut Rng, shape: Shape, color: Color, size: Size) -> Option<Object> {
        for _ in 0..200 {
            let (x, y) = (rng.random_range(0.0..1.0), rng.random_range(0.0..1.0));
            let obj = self.object_at(rng, shape, color, size, x, y);
            let b = object_box(&obj, self.w, self.h);
            if self.fits(b) {
                self.take(b);
                return Some(obj);
            }
        }
        None
    }
}

/// A random object size, favouring medium.
pub(crate) fn random_size(rng: &mut Rng) -> Size {
    pick(rng, &[Size::Small, Size::Medium, Size::Medium, Size::Large])
}

/// Pick a background contrasting with every colour in `colors` (objects and signs).
///
/// Pattern periods are whole multiples of 8 px, scaled with the image (x1 up to 191 px).
pub(crate) fn pick_background(rng: &mut Rng, colors: &[Color], w: u32, h: u32) -> Option<Background> {
    let far = |rgb: [u8; 3], min: f32| colors.iter().all(|c| palette::dist(c.rgb(), rgb) >= min);
    let plain: Vec<Color> = Color::ALL.into_iter().filter(|c| far(c.rgb(), palette::CONTRAST)).collect();
    let kind = rng.random_range(0..100);
    if kind >= 45 {
        let families: Vec<Vec<Tint>> = [Tint::LIGHT, Tint::DARK]
            .iter()
            .map(|f| f.iter().copied().filter(|t| far(t.rgb(), palette::TINT_CONTRAST)).collect::<Vec<_>>())
            .filter(|f| f.len() >= 2)
            .collect();
        if !families.is_empty() {
            let fam = &families[rng.random_range(0..families.len())];
            let a = fam[rng.random_range(0..fam.len())];
            let others: Vec<Tint> = fam.iter().copied().filter(|&t| t != a).collect();
            let b = pick(rng, &others);
            let k = ((w.min(h) as f32 / 128.0).round() as u32).max(1);
            return Some(match kind {
                45..=64 => Background::Gradient {
                    from: a,
                    to: b,
                    direction: pick(rng, &[Direction::Horizontal, Direction::Vertical, Direction::Diagonal]),
                },
                65..=76 => Background::Stripes { a, b, period: 8 * k * pick(rng, &[1, 2]), vertical: rng.random_bool(0.5) },
                77..=87 => Background::Checkerboard { a, b, period: 8 * k * pick(rng, &[1, 2]) },
                _ => Background::Dots { base: a, dot: b, period: 8 * k * pick(rng, &[2, 4]) },
            });
        }
    }
    if plain.is_empty() {
        return None;
    }
    Some(Background::Plain { color: pick(rng, &plain) })
}

/// Sample a t2i scene of `category` with its caption.
pub fn sample_t2i(rng: &mut Rng, category: Category, w: u32, h: u32) -> Result<Draft, WorldError> {
    for _ in 0..200 {
        let draft = match category {
            Category::SingleObject => single_object(rng, w, h, false),
            Category::Colors => single_object(rng, w, h, true),
            Category::TwoObjects => two_objects(rng, w, h, false),
            Category::ColorAttr => two_objects(rng, w, h, true),
            Category::Counting => counting(rng, w, h),
            Category::Position => position(rng, w, h),
            Category::Text => text(rng, w, h),
            Category::Scene => general(rng, w, h),
            Category::Edit => return Err(WorldError::NotT2i),
        };
        if let Some(d) = draft {
            return Ok(d);
        }
    }
    Err(WorldError::Placement { what: category.name().to_string() })
}

/// Finish a draft: pick a background and (sometimes) name it in the caption.
/// The words of a caption before framing, what kind of phrase they are, and how often to name
/// the background.
struct Content<'a>(&'a str, Phrase, f64);

fn finish(
    rng: &mut Rng,
    lay: &Layout,
    objects: Vec<Object>,
    sign: Option<Sign>,
    mut claims: Claims,
    Content(content, kind, p_bg): Content,
) -> Option<Draft> {
    let mut colors: Vec<Color> = objects.iter().map(|o| o.color).collect();
    colors.extend(sign.as_ref().map(|s| s.color));
    let background = pick_background(rng, &colors, lay.w, lay.h)?;
    let bg_phrase = if rng.random_bool(p_bg) {
        let (p, c) = caption::background_phrase(rng, &background);
        claims.background = c;
        Some(p)
    } else {
        None
    };
    let caption = caption::frame(rng, content, bg_phrase.as_deref(), kind);
    Some(Draft { scene: Scene { background, objects, sign }, claims, caption })
}

fn random_cell(rng: &mut Rng) -> Cell {
    // The centre is the most common place for a lone object.
    if rng.random_bool(0.3) { Cell::Center } else { pick(rng, &Cell::ALL) }
}

fn single_object(rng: &mut Rng, w: u32, h: u32, colors: bool) -> Option<Draft> {
    let mut lay = Layout::new(w, h);
    let (shape, color, size, cell) = (pick(rng, &Shape::ALL), pick(rng, &Color::ALL), random_size(rng), random_cell(rng));
    let obj = lay.try_cell(rng, shape, color, size, cell)?;
    let m = Mention {
        color: colors || rng.random_bool(0.6),
        size: rng.random_bool(if colors { 0.15 } else { 0.3 }),
        cell: rng.random_bool(if colors { 0.15 } else { 0.3 }),
    };
    let (np, claim) = caption::noun_phrase(rng, &obj, m);
    let claims = Claims { objects: vec![claim], ..Claims::default() };
    finish(rng, &lay, vec![obj], None, claims, Content(&np, Phrase::Singular, 0.25))
}

/// Two objects of different shapes in different cells. With `attr`, the colours differ and
/// the caption binds each colour to its shape ("a red square and a blue circle").
fn two_objects(rng: &mut Rng, w: u32, h: u32, attr: bool) -> Option<Draft> {
    let mut lay = Layout::new(w, h);
    let s1 = pick(rng, &Shape::ALL);
    let s2 = pick(rng, &Shape::ALL);
    let c1 = pick(rng, &Color::ALL);
    let c2 = pick(rng, &Color::ALL);
    if s1 == s2 || (attr && c1 == c2) {
        return None;
    }
    let cells = two_cells(rng);
    let (z1, z2) = (random_size(rng), random_size(rng));
    let a = lay.try_cell(rng, s1, c1, z1, cells.0)?;
    let b = lay.try_cell(rng, s2, c2, z2, cells.1)?;
    let mention_color = attr || rng.random_bool(0.25);
    let m = Mention { color: mention_color, size: !attr && rng.random_bool(0.1), cell: false };
    let (np1, cl1) = caption::noun_phrase(rng, &a, m);
    let (np2, cl2) = caption::noun_phrase(rng, &b, m);
    let joiner = pick(rng, &[" and ", " and ", " and ", " next to ", " together with ", " as well as "]);
    let content = if rng.random_bool(0.15) && !attr {
        format!("two shapes: {np1} and {np2}")
    } else {
        format!("{np1}{joiner}{np2}")
    };
    let claims = Claims { objects: vec![cl1, cl2], ..Claims::default() };
    finish(rng, &lay, vec![a, b], None, claims, Content(&content, Phrase::Singular, 0.2))
}

fn two_cells(rng: &mut Rng) -> (Cell, Cell) {
    loop {
        let a = pick(rng, &Cell::ALL);
        let b = pick(rng, &Cell::ALL);
        if a != b {
            return (a, b);
        }
    }
}

fn counting(rng: &mut Rng, w: u32, h: u32) -> Option<Draft> {
    let n: u32 = if rng.random_bool(0.05) { 1 } else { rng.random_range(2..=6) };
    let shape = pick(rng, &Shape::ALL);
    let color = pick(rng, &Color::ALL);
    let size = match n {
        1..=2 => random_size(rng),
        3..=4 => pick(rng, &[Size::Small, Size::Medium]),
        _ => Size::Small,
    };
    let mut lay = Layout::new(w, h);
    let mut objects = Vec::new();
    for _ in 0..n {
        objects.push(lay.try_anywhere(rng, shape, color, size)?);
    }
    let mention_color = rng.random_bool(0.6);
    let mention_size = rng.random_bool(0.15);
    let num = caption::number_word(rng, n);
    let mut words = vec![num.clone()];
    if mention_size {
        words.push(caption::size_word(rng, size).to_string());
    }
    if mention_color {
        words.push(caption::color_word(rng, color).to_string());
    }
    words.push(caption::shape_word(rng, shape, n != 1).to_string());
    let np = words.join(" ");
    let claims = Claims {
        objects: vec![ObjectClaim {
            shape,
            color: mention_color.then_some(color),
            size: mention_size.then_some(size),
            cell: None,
            count: Some(n),
        }],
        ..Claims::default()
    };
    let (content, kind) = match rng.random_range(0..10) {
        0 if n > 1 => (format!("exactly {np}"), Phrase::Plural),
        1 if n > 1 => (format!("{np} scattered around"), Phrase::Plural),
        2 if n > 1 => (format!("a group of {np}"), Phrase::Singular),
        3 if n > 1 => (format!("there are {np}"), Phrase::Clause),
        _ if n > 1 => (np, Phrase::Plural),
        _ => (np, Phrase::Singular),
    };
    finish(rng, &lay, objects, None, claims, Content(&content, kind, 0.2))
}

fn position(rng: &mut Rng, w: u32, h: u32) -> Option<Draft> {
    let rel = pick(rng, &[Rel::LeftOf, Rel::RightOf, Rel::Above, Rel::Below]);
    // The subject's cell and the object's cell, related along the dominant axis.
    let (ca, cb) = loop {
        let (a, b) = two_cells(rng);
        let (dx, dy) = (b.col() as i32 - a.col() as i32, b.row() as i32 - a.row() as i32);
        let ok = match rel {
            Rel::LeftOf => dx > 0 && dy.abs() < dx,
            Rel::RightOf => dx < 0 && dy.abs() < -dx,
            Rel::Above => dy > 0 && dx.abs() < dy,
            Rel::Below => dy < 0 && dx.abs() < -dy,
        };
        if ok {
            break (a, b);
        }
    };
    let s1 = pick(rng, &Shape::ALL);
    let s2 = pick(rng, &Shape::ALL);
    if s1 == s2 {
        return None;
    }
    let mut lay = Layout::new(w, h);
    let (c1, c2, z1, z2) = (pick(rng, &Color::ALL), pick(rng, &Color::ALL), random_size(rng), random_size(rng));
    let a = lay.try_cell(rng, s1, c1, z1, ca)?;
    let b = lay.try_cell(rng, s2, c2, z2, cb)?;
    let mc = rng.random_bool(0.5);
    let (np1, cl1) = caption::noun_phrase(rng, &a, Mention { color: mc, ..Mention::default() });
    let (np2, cl2) = caption::noun_phrase(rng, &b, Mention { color: mc, ..Mention::default() });
    let phrase = caption::relation_phrase(rng, rel);
    let (content, kind) = match rng.random_range(0..6) {
        0 => (format!("{np1} is {phrase} {np2}", np1 = definite(&np1)), Phrase::Clause),
        1 => (format!("{np2} with {np1} {phrase} it"), Phrase::Singular),
        _ => (format!("{np1} {phrase} {np2}"), Phrase::Singular),
    };
    let claims = Claims {
        objects: vec![cl1, cl2],
        relations: vec![Relation { subject: 0, relation: rel, object: 1 }],
        ..Claims::default()
    };
    finish(rng, &lay, vec![a, b], None, claims, Content(&content, kind, 0.15))
}

/// "a red circle" -> "the red circle"
fn definite(np: &str) -> String {
    let rest = np.strip_prefix("an ").or_else(|| np.strip_prefix("a ")).unwrap_or(np);
    format!("the {rest}")
}

/// Real words and numbers for signs (1-6 characters), mixed with random strings.
const WORDS: &[&str] = &[
    "CAT", "DOG", "STOP", "OPEN", "EXIT", "SALE", "GO", "HI", "YES", "NO", "ON", "OFF", "UP", "TAXI", "CAFE",
    "HOTEL", "PIZZA", "BAR", "BUS", "SHOP", "FOOD", "BOOK", "LOVE", "HELLO", "MILK", "TEA", "BANK", "PARK", "ZOO",
    "FIRE", "HELP", "WAIT", "PUSH", "PULL", "FREE", "NEW", "HOT", "COLD", "SUN", "MOON", "FISH", "BIRD", "TREE",
    "HOME", "CITY", "ROAD", "EAST", "WEST", "NORTH", "SOUTH", "KING", "QUEEN", "JAZZ", "QUIZ", "WIFI", "MENU",
    "POLICE", "SCHOOL", "GARAGE", "CINEMA", "MARKET", "BAKERY", "TICKET", "CLOSED", "DANGER", "ENTER", "LEFT",
    "RIGHT", "SLOW", "TOYS", "GIFT", "DELI", "INN", "ART", "MUSIC", "WATER", "BEACH", "SNOW", "RAIN", "WIND",
    "42", "7", "100", "2024", "911", "404", "A1", "B52", "24", "99", "365", "R2D2", "X", "Z", "OK", "WOW",
];

/// A word for a sign that fits a `w` x `h` image.
pub(crate) fn random_word(rng: &mut Rng, w: u32, h: u32) -> String {
    let max = super::render::max_word_len(w, h);
    if rng.random_bool(0.6) {
        let fitting: Vec<&str> = WORDS.iter().copied().filter(|x| x.len() <= max).collect();
        pick(rng, &fitting).to_string()
    } else {
        let n = rng.random_range(1..=max);
        let chars: Vec<char> = super::font::CHARSET.chars().collect();
        (0..n).map(|_| pick(rng, &chars)).collect()
    }
}

/// A sign somewhere in the image: centred horizontally (with jitter) in one of the three rows.
pub(crate) fn random_sign(rng: &mut Rng, word: String) -> Sign {
    let color = pick(rng, &Color::ALL);
    Sign {
        word,
        ink: color.ink(),
        color,
        x: q(0.5 + rng.random_range(-0.12..0.12)),
        y: q(pick(rng, &[1.0 / 6.0, 0.5, 0.5, 5.0 / 6.0]) + rng.random_range(-0.05..0.05)),
    }
}

/// Pixel box of a sign.
pub(crate) fn sign_box(sign: &Sign, w: u32, h: u32) -> [f32; 4] {
    let l = sign_layout(sign, w, h);
    [l.x0 as f32, l.y0 as f32, (l.x0 + l.w) as f32, (l.y0 + l.h) as f32]
}

fn text(rng: &mut Rng, w: u32, h: u32) -> Option<Draft> {
    let word = random_word(rng, w, h);
    let sign = random_sign(rng, word.clone());
    let mention_color = rng.random_bool(0.6);
    let thing = pick(rng, &["sign", "sign", "sign", "poster", "board", "placard"]);
    let c = caption::color_word(rng, sign.color);
    let (cw, a) = if mention_color { (format!("{c} {thing}"), caption::article(c)) } else { (thing.to_string(), caption::article(thing)) };
    let quoted = if rng.random_bool(0.25) { format!("\"{word}\"") } else { word.clone() };
    let content = match rng.random_range(0..8) {
        0 => format!("{a} {cw} that says {quoted}"),
        1 => format!("{a} {cw} that reads {quoted}"),
        2 => format!("{a} {cw} reading {quoted}"),
        3 => format!("{a} {cw} with the word {quoted}"),
        4 => format!("{a} {cw} with {quoted} written on it"),
        5 => format!("the word {quoted} on {a} {cw}"),
        6 => format!("{a} {cw} saying {quoted}"),
        _ => format!("{a} {cw} with the text {quoted}"),
    };
    let claims = Claims {
        text: Some(TextClaim { word, color: mention_color.then_some(sign.color) }),
        ..Claims::default()
    };
    finish(rng, &Layout::new(w, h), vec![], Some(sign), claims, Content(&content, Phrase::Singular, 0.2))
}

/// The general category: 1-4 objects with distinct (shape, colour), described in full or in
/// part, sometimes with a relation between two of them and the background.
fn general(rng: &mut Rng, w: u32, h: u32) -> Option<Draft> {
    let n = rng.random_range(1..=4);
    let mut lay = Layout::new(w, h);
    let mut objects: Vec<Object> = Vec::new();
    let mut cells = Cell::ALL.to_vec();
    for _ in 0..n {
        let (shape, color) = (pick(rng, &Shape::ALL), pick(rng, &Color::ALL));
        if objects.iter().any(|o| o.shape == shape && o.color == color) {
            return None;
        }
        let cell = cells.remove(rng.random_range(0..cells.len()));
        let size = random_size(rng);
        objects.push(lay.try_cell(rng, shape, color, size, cell)?);
    }
    let mut phrases = Vec::new();
    let mut claims = Claims::default();
    let mention_cells = rng.random_bool(0.4);
    for obj in &objects {
        let m = Mention { color: rng.random_bool(0.8), size: rng.random_bool(0.3), cell: mention_cells };
        let (p, c) = caption::noun_phrase(rng, obj, m);
        phrases.push(p);
        claims.objects.push(c);
    }
    let content = if n == 2 && !mention_cells && rng.random_bool(0.5) {
        let (a, b) = (&objects[0], &objects[1]);
        let rel = if (a.x - b.x).abs() > (a.y - b.y).abs() {
            if a.x < b.x { Rel::LeftOf } else { Rel::RightOf }
        } else if a.y < b.y {
            Rel::Above
        } else {
            Rel::Below
        };
        claims.relations.push(Relation { subject: 0, relation: rel, object: 1 });
        format!("{} {} {}", phrases[0], caption::relation_phrase(rng, rel), phrases[1])
    } else {
        match phrases.len() {
            1 => phrases[0].clone(),
            _ => {
                let last = phrases.pop().unwrap_or_default();
                let list = format!("{} and {last}", phrases.join(", "));
                if rng.random_bool(0.3) { format!("a scene with {list}") } else { list }
            }
        }
    };
    finish(rng, &lay, objects, None, claims, Content(&content, Phrase::Singular, 0.5))
}
