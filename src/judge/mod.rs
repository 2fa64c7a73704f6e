//! The judge: does an image show what its prompt asked for?
//!
//! Like GenEval (detector + colour classifier, per-category accuracy, overall = unweighted mean
//! of the categories), but exact for our world: `detect` finds objects by colour and geometry and
//! reads signs with the world's font; `judge` checks every claim of the sample's spec.
//!
//! Semantics per claim (t2i): an object claim needs one detected object with the claimed shape
//! and, when claimed, colour, size class and 3x3 cell (claims are matched one-to-one, so "a red
//! square and a blue circle" needs both); a `count` claim needs exactly that many matching
//! objects; a relation compares bounding-box centres (with a 5% margin); a background claim
//! needs the border to be that plain colour; a text claim needs a sign (of the colour, if
//! claimed) that reads exactly the word. Objects the caption does not mention are allowed.
//!
//! Edits are judged against the whole target scene: exactly its objects (shape, colour, size,
//! cell; attributes the instruction leaves free are not checked on the changed object), its
//! background (plain colour, or "not plain"), and its sign. That checks both that the
//! instruction was followed and that everything else was preserved.

pub mod detect;
pub mod paired;
mod shape;
pub mod text;

use std::collections::BTreeMap;
use std::fmt;

use image::RgbImage;
use serde::Serialize;

use crate::world::spec::{Claims, EditSpec, ObjectClaim, Rel, Relation, Scene};
use crate::world::{Category, Sample, Task};
pub use detect::{Detected, DetectedSign, Detection, detect};

/// The judgement of one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Every claim holds.
    pub pass: bool,
    /// Fraction of the individual checks that hold (partial credit, for diagnostics).
    pub score: f64,
    /// The first failing check, or "ok".
    pub reason: String,
}

/// Judge `image` against `sample` (for an edit, `image` is the edited result).
pub fn judge(sample: &Sample, image: &RgbImage) -> Verdict {
    check(sample, &detect(image))
}

/// Judge what `detect` found in an image against `sample`.
pub fn check(sample: &Sample, det: &Detection) -> Verdict {
    match (sample.task, &sample.spec.edit) {
        (Task::Edit, Some(edit)) => judge_edit(&sample.spec.scene, edit, det),
        (Task::Edit, None) => Verdict { pass: false, score: 0.0, reason: "edit sample without `spec.edit`".into() },
        (Task::T2i, _) => judge_claims(&sample.spec.claims, det),
    }
}

/// Collects check results and turns them into a verdict.
#[derive(Default)]
struct Checks {
    passed: usize,
    total: usize,
    first_failure: Option<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.total += 1;
        if ok {
            self.passed += 1;
        } else if self.first_failure.is_none() {
            self.first_failure = Some(what());
        }
    }

    fn verdict(self) -> Verdict {
        let score = if self.total == 0 { 1.0 } else { self.passed as f64 / self.total as f64 };
        Verdict { pass: self.first_failure.is_none(), score, reason: self.first_failure.unwrap_or_else(|| "ok".into()) }
    }
}

fn matches(claim: &ObjectClaim, d: &Detected) -> bool {
    d.shape == Some(claim.shape)
        && claim.color.is_none_or(|c| c == d.color)
        && claim.size.is_none_or(|s| s == d.size)
        && claim.cell.is_none_or(|c| c == d.cell())
}

fn holds(rel: Rel, a: &Detected, b: &Detected) -> bool {
    const MARGIN: f64 = 0.05;
    match rel {
        Rel::LeftOf => a.x + MARGIN < b.x,
        Rel::RightOf => a.x > b.x + MARGIN,
        Rel::Above => a.y + MARGIN < b.y,
        Rel::Below => a.y > b.y + MARGIN,
    }
}

/// Find a one-to-one assignment of `claims` to detected objects satisfying every claim and
/// relation (backtracking; scenes are small).
fn assign(claims: &[&ObjectClaim], relations: &[Relation], objects: &[Detected]) -> bool {
    fn go(k: usize, claims: &[&ObjectClaim], rels: &[Relation], objs: &[Detected], chosen: &mut Vec<usize>) -> bool {
        if k == claims.len() {
            return rels.iter().all(|r| match (chosen.get(r.subject), chosen.get(r.object)) {
                (Some(&a), Some(&b)) => holds(r.relation, &objs[a], &objs[b]),
                _ => false,
            });
        }
        for (i, d) in objs.iter().enumerate() {
            if !chosen.contains(&i) && matches(claims[k], d) {
                chosen.push(i);
                if go(k + 1, claims, rels, objs, chosen) {
                    return true;
                }
                chosen.pop();
            }
        }
        false
    }
    go(0, claims, relations, objects, &mut Vec::new())
}

fn describe(c: &ObjectClaim) -> String {
    let mut words = Vec::new();
    if let Some(n) = c.count {
        words.push(format!("exactly {n}"));
    }
    if let Some(s) = c.size {
        words.push(s.name().to_string());
    }
    if let Some(col) = c.color {
        words.push(col.name().to_string());
    }
    words.push(c.shape.name().to_string());
    if let Some(cell) = c.cell {
        words.push(format!("in the {}", cell.phrase()));
    }
    words.join(" ")
}

fn judge_claims(claims: &Claims, det: &Detection) -> Verdict {
    let mut checks = Checks::default();
    if let Some(bg) = claims.background {
        checks.check(det.background == Some(bg), || format!("background is not {}", bg.name()));
    }
    if let Some(t) = &claims.text {
        let ok = det.signs.iter().any(|s| s.word.eq_ignore_ascii_case(&t.word) && t.color.is_none_or(|c| c == s.color));
        let read: Vec<&str> = det.signs.iter().map(|s| s.word.as_str()).collect();
        checks.check(ok, || format!("no sign reading {} (read: {read:?})", t.word));
    }
    let (counted, single): (Vec<&ObjectClaim>, Vec<&ObjectClaim>) = claims.objects.iter().partition(|c| c.count.is_some());
    for c in counted {
        let n = det.objects.iter().filter(|d| matches(c, d)).count();
        checks.check(Some(n as u32) == c.count, || format!("found {n}, wanted {}", describe(c)));
    }
    for c in &single {
        checks.check(det.objects.iter().any(|d| matches(c, d)), || format!("no {}", describe(c)));
    }
    if single.len() > 1 || !claims.relations.is_empty() {
        // Only index-based relations on the non-counted claims make sense.
        let ok = assign(&single, &claims.relations, &det.objects);
        checks.check(ok, || match claims.relations.first() {
            Some(r) => format!("relation {:?} does not hold", r.relation),
            None => "claimed objects are not all distinct".to_string(),
        });
    }
    checks.verdict()
}

fn full_claim(o: &crate::world::spec::Object) -> ObjectClaim {
    ObjectClaim { shape: o.shape, color: Some(o.color), size: Some(o.size), cell: Some(o.cell()), count: None }
}

fn judge_edit(target: &Scene, edit: &EditSpec, det: &Detection) -> Verdict {
    let mut checks = Checks::default();
    let kind = edit.kind.name();
    let changed_claim = edit.changed.and_then(|i| edit.claim.clone().or_else(|| target.objects.get(i).map(full_claim)));
    if let Some(c) = &changed_claim {
        checks.check(det.objects.iter().any(|d| matches(c, d)), || format!("{kind} not done: no {}", describe(c)));
    }
    match target.background.plain() {
        Some(bg) => {
            let what = if edit.keep_background { "background not preserved" } else { "background not changed" };
            checks.check(det.background == Some(bg), || format!("{what}: wanted plain {}", bg.name()));
        }
        None => checks.check(det.background.is_none(), || "background not preserved (became plain)".to_string()),
    }
    match &target.sign {
        Some(sign) => {
            let ok = det.signs.iter().any(|s| {
                s.word.eq_ignore_ascii_case(&sign.word)
                    && s.color == sign.color
                    && (s.x - sign.x).abs() < 0.15
                    && (s.y - sign.y).abs() < 0.15
            });
            let what = if edit.keep_sign { "sign not preserved" } else { "sign text not changed" };
            let read: Vec<&str> = det.signs.iter().map(|s| s.word.as_str()).collect();
            checks.check(ok, || format!("{what}: wanted {} sign reading {} (read: {read:?})", sign.color.name(), sign.word));
        }
        None => checks.check(det.signs.is_empty(), || "unexpected sign".to_string()),
    }
    let n = target.objects.len();
    checks.check(det.objects.len() == n, || format!("found {} objects, wanted {n}", det.objects.len()));
    let claims: Vec<ObjectClaim> = target
        .objects
        .iter()
        .enumerate()
        .map(|(i, o)| match (&changed_claim, edit.changed == Some(i)) {
            (Some(c), true) => c.clone(),
            _ => full_claim(o),
        })
        .collect();
    let refs: Vec<&ObjectClaim> = claims.iter().collect();
    checks.check(assign(&refs, &[], &det.objects), || {
        let missing = target
            .objects
            .iter()
            .map(full_claim)
            .find(|c| !det.objects.iter().any(|d| matches(c, d)))
            .map(|c| describe(&c))
            .unwrap_or_else(|| "an object".into());
        format!("scene not preserved: no {missing}")
    });
    checks.verdict()
}

/// Per-category results, GenEval style: a category's score is its pass rate, and `overall`
/// is the unweighted mean over the categories present.
#[derive(Debug, Clone, Default)]
pub struct Report {
    rows: BTreeMap<Category, (usize, usize)>,
}

impl Report {
    pub fn new() -> Report {
        Report::default()
    }

    pub fn add(&mut self, category: Category, verdict: &Verdict) {
        let e = self.rows.entry(category).or_default();
        e.0 += 1;
        e.1 += verdict.pass as usize;
    }

    /// (category, number judged, pass rate), in report order.
    pub fn categories(&self) -> Vec<(Category, usize, f64)> {
        self.rows.iter().map(|(c, (n, p))| (*c, *n, *p as f64 / (*n).max(1) as f64)).collect()
    }

    pub fn score(&self, category: Category) -> Option<f64> {
        self.categories().into_iter().find(|r| r.0 == category).map(|r| r.2)
    }

    /// Unweighted mean of the category scores (0 if empty).
    pub fn overall(&self) -> f64 {
        let cats = self.categories();
        if cats.is_empty() { 0.0 } else { cats.iter().map(|r| r.2).sum::<f64>() / cats.len() as f64 }
    }
}

impl Serialize for Report {
    /// `{"single_object": 0.99, ..., "overall": 0.98}`
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let cats = self.categories();
        let mut m = s.serialize_map(Some(cats.len() + 1))?;
        for (c, _, score) in &cats {
            m.serialize_entry(c.name(), score)?;
        }
        m.serialize_entry("overall", &self.overall())?;
        m.end()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<14} {:>6} {:>7}", "category", "n", "score")?;
        let mut total = 0;
        for (c, n, score) in self.categories() {
            writeln!(f, "{:<14} {n:>6} {score:>7.3}", c.name())?;
            total += n;
        }
        write!(f, "{:<14} {total:>6} {:>7.3}", "overall", self.overall())
    }
}

/// Blur (Gaussian, `sigma` px; 0 = none) then, if `jpeg` is set, round-trip through JPEG at that
/// quality: what the robustness check does to ground-truth images.
pub fn degrade(img: &RgbImage, sigma: f32, jpeg: Option<u8>) -> Result<RgbImage, image::ImageError> {
    let mut out = if sigma > 0.0 { image::imageops::blur(img, sigma) } else { img.clone() };
    if let Some(q) = jpeg {
        let mut buf = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, q.clamp(1, 100));
        out.write_with_encoder(enc)?;
        out = image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)?.to_rgb8();
    }
    Ok(out)
}
