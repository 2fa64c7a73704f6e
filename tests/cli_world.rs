//! `tessera world ...` and `tessera eval` as a user runs them, including bad input. See: #3

use std::path::Path;

use assert_cmd::Command;
use predicates::prelude::*;

fn tessera() -> Command {
    Command::cargo_bin("tessera").unwrap()
}

fn sample(dir: &Path, args: &[&str]) {
    tessera()
        .args(["world", "sample", "--out"])
        .arg(dir)
        .args(args)
        .assert()
        .success()
        .stderr(predicate::str::contains("images/s"));
}

/// Every `step`-th line of eval/bench.jsonl as DIR/few.jsonl; returns its path and line count.
fn bench_subset(dir: &Path, step: usize) -> (std::path::PathBuf, usize) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/eval/bench.jsonl")).unwrap();
    let picked: Vec<&str> = text.lines().step_by(step).collect();
    let few = dir.join("few.jsonl");
    std::fs::write(&few, picked.join("\n")).unwrap();
    (few, picked.len())
}

fn eval_json(bench: &Path, images: &Path) -> serde_json::Value {
    let out = tessera().args(["eval", "--json", "--bench"]).arg(bench).arg("--images").arg(images).assert().success();
    serde_json::from_slice(&out.get_output().stdout).unwrap()
}

#[test]
fn sampled_ground_truth_judges_perfectly() {
    let dir = tempfile::tempdir().unwrap();
    let t2i = dir.path().join("t2i");
    sample(&t2i, &["--count", "60", "--seed", "4", "--size", "160x128"]);
    let lines = std::fs::read_to_string(t2i.join("samples.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 60);
    let json = eval_json(&t2i.join("samples.jsonl"), &t2i);
    assert_eq!(json["overall"], 1.0, "{json}");

    let edit = dir.path().join("edit");
    sample(&edit, &["--count", "30", "--seed", "4", "--task", "edit", "--categories", "move,text"]);
    let json = eval_json(&edit.join("samples.jsonl"), &edit);
    assert_eq!(json, serde_json::json!({"edit": 1.0, "overall": 1.0}));
    for line in std::fs::read_to_string(edit.join("samples.jsonl")).unwrap().lines() {
        assert!(line.contains("\"edit_kind\":\"move\"") || line.contains("\"edit_kind\":\"text\""));
    }
}

#[test]
fn raw_format_writes_only_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path(), &["--count", "10", "--format", "raw", "--size", "64x96", "--categories", "counting"]);
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(std::fs::metadata(dir.path().join("images.u8")).unwrap().len(), 10 * 64 * 96 * 3);
}

#[test]
fn thread_count_does_not_change_the_output() {
    let dir = tempfile::tempdir().unwrap();
    for threads in ["1", "2"] {
        tessera()
            .env("RAYON_NUM_THREADS", threads)
            .args(["world", "sample", "--count", "50", "--seed", "8", "--format", "raw", "--out"])
            .arg(dir.path().join(threads))
            .assert()
            .success();
    }
    for f in ["samples.jsonl", "images.u8"] {
        let a = std::fs::read(dir.path().join("1").join(f)).unwrap();
        let b = std::fs::read(dir.path().join("2").join(f)).unwrap();
        assert!(a == b, "{f} depends on the thread count");
    }
}

/// A bench of three samples with their images, for the error cases.
fn small_bench(dir: &Path) -> (std::path::PathBuf, Vec<String>) {
    sample(dir, &["--count", "3", "--seed", "1"]);
    let bench = dir.join("samples.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&bench).unwrap().lines().map(String::from).collect();
    (bench, lines)
}

fn one_line_error(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr).to_string();
    assert_eq!(s.trim_end().lines().count(), 1, "not one line: {s}");
    assert!(!s.contains("panicked"), "{s}");
    s
}

#[test]
fn missing_image_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let (bench, _) = small_bench(dir.path());
    std::fs::remove_file(dir.path().join("t2i-s1-0000001.png")).unwrap();
    let out = tessera().args(["eval", "--bench"]).arg(&bench).arg("--images").arg(dir.path()).assert().failure();
    let err = one_line_error(&out.get_output().stderr);
    assert!(err.contains("samples.jsonl:2") && err.contains("t2i-s1-0000001.png"), "{err}");
}

#[test]
fn wrong_size_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let (bench, _) = small_bench(dir.path());
    image::RgbImage::new(64, 64).save(dir.path().join("t2i-s1-0000002.png")).unwrap();
    let out = tessera().args(["eval", "--bench"]).arg(&bench).arg("--images").arg(dir.path()).assert().failure();
    let err = one_line_error(&out.get_output().stderr);
    assert!(err.contains("samples.jsonl:3") && err.contains("64x64") && err.contains("128x128"), "{err}");
}

#[test]
fn malformed_line_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let (bench, lines) = small_bench(dir.path());
    for (broken, what) in [
        (lines[1][..lines[1].len() / 2].to_string(), "malformed"),
        (lines[1].replace("\"task\":\"t2i\"", "\"task\":\"paint\""), "malformed"),
        (lines[1].replace("\"caption\"", "\"kaption\""), "caption"),
    ] {
        let text = format!("{}\n{broken}\n{}\n", lines[0], lines[2]);
        std::fs::write(&bench, text).unwrap();
        let out = tessera().args(["eval", "--bench"]).arg(&bench).arg("--images").arg(dir.path()).assert().failure();
        let err = one_line_error(&out.get_output().stderr);
        assert!(err.contains("samples.jsonl:2") && err.contains(what), "{err}");
    }
    let out = tessera().args(["eval", "--bench", "no-such-bench.jsonl", "--images", "."]).assert().failure();
    let err = one_line_error(&out.get_output().stderr);
    assert!(err.contains("no-such-bench.jsonl"), "{err}");
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    tessera()
        .args(["world", "sample", "--count", "1", "--categories", "single_object,sculpture", "--out"])
        .arg(dir.path())
        .assert()
        .failure()
        .stderr(predicate::str::contains("unknown t2i category `sculpture`"));
    tessera()
        .args(["world", "sample", "--count", "1", "--size", "12x12", "--out"])
        .arg(dir.path())
        .assert()
        .failure()
        .stderr(predicate::str::contains("12x12 is not supported"));
    tessera()
        .args(["world", "sample", "--count", "1", "--size", "big", "--out"])
        .arg(dir.path())
        .assert()
        .failure()
        .stderr(predicate::str::contains("WIDTHxHEIGHT"));
}

#[test]
fn render_degrades_and_eval_prints_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let (few, _) = bench_subset(dir.path(), 40);
    let images = dir.path().join("img");
    tessera()
        .args(["world", "render", "--blur", "1", "--jpeg", "75", "--samples"])
        .arg(&few)
        .arg("--out")
        .arg(&images)
        .assert()
        .success();
    tessera()
        .args(["eval", "--bench"])
        .arg(&few)
        .arg("--images")
        .arg(&images)
        .assert()
        .success()
        .stdout(predicate::str::contains("single_object").and(predicate::str::contains("overall")));
}

#[test]
fn verdicts_compare_paired_and_name_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let (few, n) = bench_subset(dir.path(), 20);
    // The same samples, once clean and once blurred hard enough to fail some of them.
    let mut verdicts = Vec::new();
    for (name, blur) in [("clean", "0"), ("blurred", "2.5")] {
        let images = dir.path().join(name);
        tessera().args(["world", "render", "--blur", blur, "--samples"]).arg(&few).arg("--out").arg(&images).assert().success();
        let file = dir.path().join(format!("{name}.jsonl"));
        tessera().args(["eval", "--json", "--bench"]).arg(&few).arg("--images").arg(&images).arg("--verdicts").arg(&file).assert().success();
        let lines = std::fs::read_to_string(&file).unwrap();
        assert_eq!(lines.lines().count(), n);
        verdicts.push(file);
    }
    let clean = std::fs::read_to_string(&verdicts[0]).unwrap();
    assert!(clean.lines().all(|l| l.contains("\"pass\":true")), "{clean}");
    let failed = std::fs::read_to_string(&verdicts[1]).unwrap().lines().filter(|l| l.contains("\"pass\":false")).count();
    assert!(failed > 0, "blur 2.5 should fail some samples");

    // Base = blurred, candidate = clean: every difference is a win for the candidate.
    let out = tessera().args(["eval", "--json", "--compare"]).arg(&verdicts[1]).arg(&verdicts[0]).assert().success();
    let json: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(json["won"], failed as u64, "{json}");
    assert_eq!(json["lost"], 0, "{json}");
    assert_eq!(json["candidate"], 1.0, "{json}");
    assert!(json["diff"].as_f64().unwrap() > 0.0 && json["se"].as_f64().unwrap() > 0.0, "{json}");
    // Two runs pooled: the same pair twice keeps the difference.
    let out = tessera()
        .args(["eval", "--json", "--compare"])
        .arg(&verdicts[1])
        .arg(&verdicts[0])
        .arg("--compare")
        .arg(&verdicts[1])
        .arg(&verdicts[0])
        .assert()
        .success();
    let twice: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(twice["runs"], 2);
    assert!((twice["diff"].as_f64().unwrap() - json["diff"].as_f64().unwrap()).abs() < 1e-12);

    // A bench file is not a verdicts file; a shorter file is named with the count.
    tessera()
        .args(["eval", "--compare"])
        .arg(&few)
        .arg(&verdicts[0])
        .assert()
        .failure()
        .stderr(predicate::str::contains("not a verdict line"));
    let short = dir.path().join("short.jsonl");
    std::fs::write(&short, clean.lines().next().unwrap()).unwrap();
    tessera()
        .args(["eval", "--compare"])
        .arg(&verdicts[0])
        .arg(&short)
        .assert()
        .failure()
        .stderr(predicate::str::contains(format!("{n} base verdicts, 1 candidate verdicts")));
}
