//! Paired comparison of two models judged on the same prompts with the same seeds: is the
//! candidate measurably better than the base?
//!
//! `tessera eval --verdicts FILE` writes one [`VerdictLine`] per judged sample. Two such files
//! from one bench and seed (base and candidate) form a run; [`compare`] pairs their samples by
//! id and pools several runs (other seeds, other benches). Because both models saw the same
//! prompt and the same per-prompt seed, only the discordant prompts (one passes, the other
//! fails) carry information, and the standard error of the difference comes from them alone —
//! far tighter than comparing two independent scores.
//!
//! The overall difference follows the judge's `overall` (the unweighted mean of the category
//! scores): within a run, sample i of category c weighs w_i = 1 / (C * n_c), the difference is
//! sum_i w_i d_i with d_i = pass_candidate - pass_base in {-1, 0, 1}, and its variance is taken
//! as sum_i w_i^2 d_i^2 (the prompts as the random draw). Runs are averaged with equal weight.
//! With equal category sizes this is (won - lost) / n with standard error sqrt(won + lost) / n.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::world::Category;

/// One judged sample, a line of `tessera eval --verdicts FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictLine {
    pub id: String,
    pub category: Category,
    pub pass: bool,
    /// The first failing check, or "ok".
    pub reason: String,
}

/// One category, pooled over the runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CategoryRow {
    /// Paired samples (over all runs).
    pub n: usize,
    /// Pass rates of the base and the candidate.
    pub base: f64,
    pub candidate: f64,
    /// Samples only the candidate passes / only the base passes.
    pub won: usize,
    pub lost: usize,
    /// candidate - base.
    pub diff: f64,
}

/// The result of [`compare`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub runs: usize,
    pub samples: usize,
    pub categories: BTreeMap<Category, CategoryRow>,
    /// Mean over the runs of the judge's overall score (the unweighted category mean).
    pub base: f64,
    pub candidate: f64,
    pub won: usize,
    pub lost: usize,
    /// candidate - base, and its standard error.
    pub diff: f64,
    pub se: f64,
}

impl Comparison {
    /// diff / se (0 when nothing differs).
    pub fn z(&self) -> f64 {
        if self.se > 0.0 { self.diff / self.se } else { 0.0 }
    }
}

/// Pair each run's base and candidate verdicts by sample id and pool the runs. Errors name the
/// run (1-based) and the sample when the two files do not hold the same samples.
pub fn compare(runs: &[(Vec<VerdictLine>, Vec<VerdictLine>)]) -> Result<Comparison, String> {
    if runs.is_empty() {
        return Err("no runs to compare".into());
    }
    let mut cats: BTreeMap<Category, (usize, usize, usize, usize, usize)> = BTreeMap::new();
    let (mut base_sum, mut cand_sum, mut diff_sum, mut var_sum) = (0.0, 0.0, 0.0, 0.0);
    let (mut won, mut lost, mut samples) = (0, 0, 0);
    for (r, (base, cand)) in runs.iter().enumerate() {
        let run = r + 1;
        if base.is_empty() {
            return Err(format!("run {run}: the base has no verdicts"));
        }
        let mut by_id: HashMap<&str, &VerdictLine> = HashMap::with_capacity(base.len());
        for v in base {
            if by_id.insert(&v.id, v).is_some() {
                return Err(format!("run {run}: sample `{}` appears twice in the base", v.id));
            }
        }
        if cand.len() != base.len() {
            return Err(format!("run {run}: {} base verdicts, {} candidate verdicts", base.len(), cand.len()));
        }
        // Per category of this run: (n, base passes, candidate passes, won, lost).
        let mut rows: BTreeMap<Category, (usize, usize, usize, usize, usize)> = BTreeMap::new();
        let mut seen = std::collections::HashSet::with_capacity(cand.len());
        for c in cand {
            let b = by_id.get(c.id.as_str()).ok_or_else(|| format!("run {run}: sample `{}` is not in the base", c.id))?;
            if !seen.insert(c.id.as_str()) {
                return Err(format!("run {run}: sample `{}` appears twice in the candidate", c.id));
            }
            if b.category != c.category {
                return Err(format!("run {run}: sample `{}` is {} in the base, {} in the candidate", c.id, b.category.name(), c.category.name()));
            }
            let e = rows.entry(c.category).or_default();
            e.0 += 1;
            e.1 += b.pass as usize;
            e.2 += c.pass as usize;
            e.3 += (c.pass && !b.pass) as usize;
            e.4 += (b.pass && !c.pass) as usize;
        }
        let k = rows.len() as f64;
        for (cat, (n, bp, cp, w, l)) in &rows {
            let nf = *n as f64;
            base_sum += *bp as f64 / nf / k;
            cand_sum += *cp as f64 / nf / k;
            diff_sum += (*w as f64 - *l as f64) / nf / k;
            var_sum += (*w + *l) as f64 / (nf * k).powi(2);
            let t = cats.entry(*cat).or_default();
            t.0 += n;
            t.1 += bp;
            t.2 += cp;
            t.3 += w;
            t.4 += l;
            won += w;
            lost += l;
            samples += n;
        }
    }
    let runs_f = runs.len() as f64;
    let categories = cats
        .into_iter()
        .map(|(c, (n, bp, cp, w, l))| {
            let nf = n as f64;
            (c, CategoryRow { n, base: bp as f64 / nf, candidate: cp as f64 / nf, won: w, lost: l, diff: (w as f64 - l as f64) / nf })
        })
        .collect();
    Ok(Comparison {
        runs: runs.len(),
        samples,
        categories,
        base: base_sum / runs_f,
        candidate: cand_sum / runs_f,
        won,
        lost,
        diff: diff_sum / runs_f,
        se: var_sum.sqrt() / runs_f,
    })
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "paired: {} run(s), {} samples (won: only the candidate passes; lost: only the base)", self.runs, self.samples)?;
        writeln!(f, "{:<14} {:>6} {:>7} {:>9} {:>5} {:>5} {:>8}", "category", "n", "base", "candidate", "won", "lost", "diff")?;
        for (c, r) in &self.categories {
            writeln!(f, "{:<14} {:>6} {:>7.3} {:>9.3} {:>5} {:>5} {:>+8.3}", c.name(), r.n, r.base, r.candidate, r.won, r.lost, r.diff)?;
        }
        write!(
            f,
            "{:<14} {:>6} {:>7.4} {:>9.4} {:>5} {:>5} {:>+8.4} (se {:.4}, {:+.1} se)",
            "overall",
            self.samples,
            self.base,
            self.candidate,
            self.won,
            self.lost,
            self.diff,
            self.se,
            self.z()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(id: &str, category: Category, pass: bool) -> VerdictLine {
        VerdictLine { id: id.into(), category, pass, reason: if pass { "ok".into() } else { "no".into() } }
    }

    #[test]
    fn equal_categories_give_the_discordant_count_formula() {
        // 4 samples in each of two categories: 3 won, 1 lost overall.
        let base = vec![
            v("a1", Category::Text, false),
            v("a2", Category::Text, false),
            v("a3", Category::Text, true),
            v("a4", Category::Text, true),
            v("b1", Category::Edit, false),
            v("b2", Category::Edit, true),
            v("b3", Category::Edit, true),
            v("b4", Category::Edit, false),
        ];
        let mut cand = base.clone();
        cand[0].pass = true; // won
        cand[1].pass = true; // won
        cand[2].pass = false; // lost
        cand[4].pass = true; // won
        cand.reverse(); // pairing is by id, not by order
        let c = compare(&[(base, cand)]).unwrap();
        assert_eq!((c.won, c.lost, c.samples), (3, 1, 8));
        assert!((c.diff - 2.0 / 8.0).abs() < 1e-12);
        assert!((c.se - 4f64.sqrt() / 8.0).abs() < 1e-12);
        assert!((c.base - 0.5).abs() < 1e-12 && (c.candidate - 0.75).abs() < 1e-12);
        let text = &c.categories[&Category::Text];
        assert_eq!((text.n, text.won, text.lost), (4, 2, 1));
        assert!((text.diff - 0.25).abs() < 1e-12);
    }

    #[test]
    fn runs_pool_with_equal_weight_and_unequal_categories_follow_overall() {
        // Run 1: one text sample (won) and three edits (unchanged): overall moves by 1/2.
        let b1 = vec![v("t", Category::Text, false), v("e1", Category::Edit, true), v("e2", Category::Edit, true), v("e3", Category::Edit, false)];
        let mut c1 = b1.clone();
        c1[0].pass = true;
        // Run 2: nothing differs.
        let b2 = b1.clone();
        let c2 = b1.clone();
        let c = compare(&[(b1, c1), (b2, c2)]).unwrap();
        assert!((c.diff - 0.25).abs() < 1e-12, "{}", c.diff);
        assert!((c.se - 0.25).abs() < 1e-12, "{}", c.se);
        assert_eq!((c.runs, c.samples, c.won, c.lost), (2, 8, 1, 0));
    }

    #[test]
    fn mismatched_files_are_named() {
        let base = vec![v("a", Category::Text, true), v("b", Category::Text, true)];
        let other = vec![v("a", Category::Text, true), v("c", Category::Text, true)];
        assert_eq!(compare(&[(base.clone(), other)]).unwrap_err(), "run 1: sample `c` is not in the base");
        let short = vec![v("a", Category::Text, true)];
        assert!(compare(&[(base.clone(), short)]).unwrap_err().contains("2 base verdicts, 1 candidate"));
        let twice = vec![v("a", Category::Text, true), v("a", Category::Text, true)];
        assert!(compare(&[(base.clone(), twice)]).unwrap_err().contains("twice in the candidate"));
        let recat = vec![v("a", Category::Edit, true), v("b", Category::Text, true)];
        assert!(compare(&[(base, recat)]).unwrap_err().contains("is text in the base, edit in the candidate"));
        assert!(compare(&[]).is_err());
    }
}
