//! Edit triples: a source scene, an instruction, and the target scene, with an `EditSpec` that
//! says what changed and what must stay.
//!
//! Edit scenes put at most one object per 3x3 cell and never repeat a (shape, colour) pair, so
//! every instruction can name its object unambiguously ("the circle" or "the red circle").

use rand::Rng as _;

use super::WorldError;
use super::caption::{self, Mention};
use super::palette::{self, Color};
use super::render::object_box;
use super::sampler::{Layout, Rng, pick, pick_background, random_sign, random_size, random_word, sign_box};
use super::spec::{Background, Cell, EditKind, EditSpec, Object, ObjectClaim, Scene, Shape, Sign, Size, Spec};

/// An edit triple before it is written out.
#[derive(Debug, Clone)]
pub struct EditDraft {
    pub kind: EditKind,
    pub source: Scene,
    pub target: Spec,
    pub instruction: String,
}

/// Sample an edit of `kind`.
pub fn sample_edit(rng: &mut Rng, kind: EditKind, w: u32, h: u32) -> Result<EditDraft, WorldError> {
    for _ in 0..200 {
        let draft = match kind {
            EditKind::Recolor => recolor(rng, w, h),
            EditKind::Remove => remove(rng, w, h),
            EditKind::Add => add(rng, w, h),
            EditKind::Move => move_object(rng, w, h),
            EditKind::Resize => resize(rng, w, h),
            EditKind::Background => background(rng, w, h),
            EditKind::Text => text(rng, w, h),
        };
        if let Some(d) = draft {
            return Ok(d);
        }
    }
    Err(WorldError::Placement { what: format!("{} edit", kind.name()) })
}

/// `n` objects on distinct cells with distinct (shape, colour) pairs, and a background for them.
fn source_scene(rng: &mut Rng, n: usize, w: u32, h: u32) -> Option<(Vec<Object>, Background)> {
    let mut lay = Layout::new(w, h);
    let mut cells = Cell::ALL.to_vec();
    let mut objects: Vec<Object> = Vec::new();
    for _ in 0..n {
        let (shape, color) = (pick(rng, &Shape::ALL), pick(rng, &Color::ALL));
        if objects.iter().any(|o| o.shape == shape && o.color == color) {
            return None;
        }
        let cell = cells.remove(rng.random_range(0..cells.len()));
        let size = random_size(rng);
        objects.push(lay.try_cell(rng, shape, color, size, cell)?);
    }
    let colors: Vec<Color> = objects.iter().map(|o| o.color).collect();
    let bg = pick_background(rng, &colors, w, h)?;
    Some((objects, bg))
}

/// A layout holding every object except `skip`.
fn layout_without(objects: &[Object], skip: Option<usize>, w: u32, h: u32) -> Layout {
    let mut lay = Layout::new(w, h);
    for (i, o) in objects.iter().enumerate() {
        if Some(i) != skip {
            lay.take(object_box(o, w, h));
        }
    }
    lay
}

fn contrasts(color: Color, bg: &Background) -> bool {
    let min = if bg.plain().is_some() { palette::CONTRAST } else { palette::TINT_CONTRAST };
    bg.colors().iter().all(|&c| palette::dist(color.rgb(), c) >= min)
}

fn full_claim(obj: &Object) -> ObjectClaim {
    ObjectClaim { shape: obj.shape, color: Some(obj.color), size: Some(obj.size), cell: Some(obj.cell()), count: None }
}

fn draft(kind: EditKind, source: Scene, target: Scene, edit: EditSpec, instruction: String) -> Option<EditDraft> {
    Some(EditDraft { kind, source, target: Spec { scene: target, claims: Default::default(), edit: Some(edit) }, instruction })
}

/// The spec of an edit that changes (or adds) object `changed` and keeps every other object.
fn object_edit(kind: EditKind, target: &[Object], changed: usize, claim: ObjectClaim) -> EditSpec {
    EditSpec {
        kind,
        changed: Some(changed),
        removed: None,
        claim: Some(claim),
        keep: (0..target.len()).filter(|&i| i != changed).collect(),
        keep_background: true,
        keep_sign: true,
    }
}

fn recolor(rng: &mut Rng, w: u32, h: u32) -> Option<EditDraft> {
    let n = rng.random_range(1..=3);
    let (objects, bg) = source_scene(rng, n, w, h)?;
    let i = rng.random_range(0..objects.len());
    let obj = &objects[i];
    let new = pick(rng, &Color::ALL);
    if new == obj.color || !contrasts(new, &bg) || objects.iter().any(|o| o.shape == obj.shape && o.color == new) {
        return None;
    }
    let r = caption::reference(rng, obj, &objects);
    let c = caption::color_word(rng, new);
    let instruction = match rng.random_range(0..8) {
        0 => format!("make {r} {c}"),
        1 => format!("change {r} to {c}"),
        2 => format!("turn {r} {c}"),
        3 => format!("color {r} {c}"),
        4 => format!("paint {r} {c}"),
        5 => format!("recolor {r} to {c}"),
        6 => format!("change the color of {r} to {c}"),
        _ => format!("{r} should be {c}"),
    };
    let mut target = objects.clone();
    target[i].color = new;
    let edit = object_edit(EditKind::Recolor, &target, i, full_claim(&target[i]));
    let source = Scene { background: bg.clone(), objects, sign: None };
    draft(EditKind::Recolor, source, Scene { background: bg, objects: target, sign: None }, edit, instruction)
}

fn remove(rng: &mut Rng, w: u32, h: u32) -> Option<EditDraft> {
    let n = rng.random_range(1..=4);
    let (objects, bg) = source_scene(rng, n, w, h)?;
    let i = rng.random_range(0..objects.len());
    let r = caption::reference(rng, &objects[i], &objects);
    let instruction = match rng.random_range(0..6) {
        0 | 1 => format!("remove {r}"),
        2 => format!("delete {r}"),
        3 => format!("take away {r}"),
        4 => format!("get rid of {r}"),
        _ => format!("erase {r}"),
    };
    let mut target = objects.clone();
    target.remove(i);
    let edit = EditSpec {
        kind: EditKind::Remove,
        changed: None,
        removed: Some(i),
        claim: None,
        keep: (0..target.len()).collect(),
        keep_background: true,
        keep_sign: true,
    };
    let source = Scene { background: bg.clone(), objects, sign: None };
    draft(EditKind::Remove, source, Scene { background: bg, objects: target, sign: None }, edit, instruction)
}

fn add(rng: &mut Rng, w: u32, h: u32) -> Option<EditDraft> {
    let n = rng.random_range(0..=3);
    let (objects, bg) = source_scene(rng, n, w, h)?;
    let (shape, color) = (pick(rng, &Shape::ALL), pick(rng, &Color::ALL));
    if !contrasts(color, &bg) || objects.iter().any(|o| o.shape == shape && o.color == color) {
        return None;
    }
    let free: Vec<Cell> = Cell::ALL.into_iter().filter(|c| objects.iter().all(|o| o.cell() != *c)).collect();
    let cell = pick(rng, &free);
    let mut lay = layout_without(&objects, None, w, h);
    let size = random_size(rng);
    let new = lay.try_cell(rng, shape, color, size, cell)?;
    let m = Mention { color: true, size: rng.random_bool(0.5), cell: false };
    let (np, mut claim) = caption::noun_phrase(rng, &new, m);
    claim.cell = Some(cell);
    let at = caption::cell_phrase(rng, cell);
    let instruction = match rng.random_range(0..6) {
        0 | 1 => format!("add {np} {at}"),
        2 => format!("put {np} {at}"),
        3 => format!("place {np} {at}"),
        4 => format!("draw {np} {at}"),
        _ => format!("{at}, add {np}"),
    };
    let mut target = objects.clone();
    target.push(new);
    let edit = object_edit(EditKind::Add, &target, target.len() - 1, claim);
    let source = Scene { background: bg.clone(), objects, sign: None };
    draft(EditKind::Add, source, Scene { background: bg, objects: target, sign: None }, edit, instruction)
}

/// "to the top left", "to the middle", ...
fn destination(rng: &mut Rng, cell: Cell) -> String {
    match cell {
        Cell::Center => pick(rng, &["to the center", "to the middle"]).to_string(),
        Cell::Top => pick(rng, &["to the top", "to the top center"]).to_string(),
        Cell::Bottom => pick(rng, &["to the bottom", "to the bottom center"]).to_string(),
        Cell::Left => pick(rng, &["to the left", "to the left side"]).to_string(),
        Cell::Right => pick(rng, &["to the right", "to the right side"]).to_string(),
        c if rng.random_bool(0.3) => format!("to the {} corner", c.phrase()),
        c => format!("to the {}", c.phrase()),
    }
}

fn move_object(rng: &mut Rng, w: u32, h: u32) -> Option<EditDraft> {
    let n = rng.random_range(1..=3);
    let (objects, bg) = source_scene(rng, n, w, h)?;
    let i = rng.random_range(0..objects.len());
    let obj = &objects[i];
    let free: Vec<Cell> = Cell::ALL.into_iter().filter(|c| objects.iter().all(|o| o.cell() != *c)).collect();
    let cell = pick(rng, &free);
    let mut lay = layout_without(&objects, Some(i), w, h);
    let mut moved = lay.try_cell(rng, obj.shape, obj.color, obj.size, cell)?;
    moved.extent = obj.extent;
    if !layout_without(&objects, Some(i), w, h).fits(object_box(&moved, w, h)) || moved.cell() != cell {
        return None;
    }
    let r = caption::reference(rng, obj, &objects);
    let to = destination(rng, cell);
    let instruction = match rng.random_range(0..5) {
        0 | 1 => format!("move {r} {to}"),
        2 => format!("shift {r} {to}"),
        3 => format!("drag {r} {to}"),
        _ => format!("put {r} {}", caption::cell_phrase(rng, cell)),
    };
    let mut target = objects.clone();
    target[i] = moved;
    let edit = object_edit(EditKind::Move, &target, i, full_claim(&target[i]));
    let source = Scene { background: bg.clone(), objects, sign: None };
    draft(EditKind::Move, source, Scene { background: bg, objects: target, sign: None }, edit, instruction)
}

fn resize(rng: &mut Rng, w: u32, h: u32) -> Option<EditDraft> {
    let n = rng.random_range(1..=3);
    let (objects, bg) = source_scene(rng, n, w, h)?;
    let i = rng.random_range(0..objects.len());
    let obj = &objects[i];
    let bigger = match (obj.size.bigger(), obj.size.smaller()) {
        (Some(_), Some(_)) => rng.random_bool(0.5),
        (Some(_), None) => true,
        _ => false,
    };
    let new_size = if bigger { obj.size.bigger() } else { obj.size.smaller() }?;
    let lay = layout_without(&objects, Some(i), w, h);
    let resized = lay.object_at(rng, obj.shape, obj.color, new_size, obj.x, obj.y);
    if resized.cell() != obj.cell() || !lay.fits(object_box(&resized, w, h)) {
        return None;
    }
    let r = caption::reference(rng, obj, &objects);
    let instruction = if rng.random_bool(0.2) {
        format!("make {r} {}", caption::size_word(rng, new_size))
    } else if bigger {
        match rng.random_range(0..4) {
            0 => format!("make {r} bigger"),
            1 => format!("make {r} larger"),
            2 => format!("enlarge {r}"),
            _ => format!("increase the size of {r}"),
        }
    } else {
        match rng.random_range(0..4) {
            0 => format!("make {r} smaller"),
            1 => format!("shrink {r}"),
            2 => format!("reduce the size of {r}"),
            _ => format!("make {r} a bit smaller"),
        }
    };
    let mut target = objects.clone();
    target[i] = resized;
    let edit = object_edit(EditKind::Resize, &target, i, full_claim(&target[i]));
    let source = Scene { background: bg.clone(), objects, sign: None };
    draft(EditKind::Resize, source, Scene { background: bg, objects: target, sign: None }, edit, instruction)
}

fn background(rng: &mut Rng, w: u32, h: u32) -> Option<EditDraft> {
    let n = rng.random_range(1..=3);
    let (objects, bg) = source_scene(rng, n, w, h)?;
    let new = pick(rng, &Color::ALL);
    let new_bg = Background::Plain { color: new };
    if bg.plain() == Some(new) || objects.iter().any(|o| !contrasts(o.color, &new_bg)) {
        return None;
    }
    let c = caption::color_word(rng, new);
    let instruction = match rng.random_range(0..7) {
        0 | 1 => format!("change the background to {c}"),
        2 => format!("make the background {c}"),
        3 => format!("turn the background {c}"),
        4 => format!("set the background to {c}"),
        5 => format!("use a {c} background"),
        _ => format!("paint the background {c}"),
    };
    let edit = EditSpec {
        kind: EditKind::Background,
        changed: None,
        removed: None,
        claim: None,
        keep: (0..objects.len()).collect(),
        keep_background: false,
        keep_sign: true,
    };
    let target = Scene { background: new_bg, objects: objects.clone(), sign: None };
    draft(EditKind::Background, Scene { background: bg, objects, sign: None }, target, edit, instruction)
}

fn text(rng: &mut Rng, w: u32, h: u32) -> Option<EditDraft> {
    let old = random_word(rng, w, h);
    let new = random_word(rng, w, h);
    if old == new {
        return None;
    }
    let sign = random_sign(rng, old.clone());
    let new_sign = Sign { word: new.clone(), ..sign.clone() };
    let mut lay = Layout::new(w, h);
    let (a, b) = (sign_box(&sign, w, h), sign_box(&new_sign, w, h));
    lay.take([a[0].min(b[0]), a[1].min(b[1]), a[2].max(b[2]), a[3].max(b[3])]);
    let mut objects = Vec::new();
    if rng.random_bool(0.5) {
        let size = pick(rng, &[Size::Small, Size::Medium]);
        let (shape, color, cell) = (pick(rng, &Shape::ALL), pick(rng, &Color::ALL), pick(rng, &Cell::ALL));
        objects.push(lay.try_cell(rng, shape, color, size, cell)?);
    }
    let mut colors: Vec<Color> = objects.iter().map(|o| o.color).collect();
    colors.push(sign.color);
    let bg = pick_background(rng, &colors, w, h)?;
    let thing = pick(rng, &["sign", "sign", "poster"]);
    let instruction = match rng.random_range(0..7) {
        0 | 1 => format!("make the {thing} say {new}"),
        2 => format!("change the text to {new}"),
        3 => format!("replace {old} with {new}"),
        4 => format!("change the word on the {thing} to {new}"),
        5 => format!("write {new} on the {thing} instead"),
        _ => format!("the {thing} should read {new}"),
    };
    let edit = EditSpec {
        kind: EditKind::Text,
        changed: None,
        removed: None,
        claim: None,
        keep: (0..objects.len()).collect(),
        keep_background: true,
        keep_sign: false,
    };
    let source = Scene { background: bg.clone(), objects: objects.clone(), sign: Some(sign) };
    draft(EditKind::Text, source, Scene { background: bg, objects, sign: Some(new_sign) }, edit, instruction)
}
