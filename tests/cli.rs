//! The real binary on the tiny fixture model: every command, the flag families, and bad input
//! (one clear line, non-zero exit, no panic, no half-written file).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use predicates::prelude::*;

fn model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-t4").display().to_string()
}

fn tessera() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("tessera").unwrap();
    c.env_remove("TESSERA_MODEL");
    c
}

/// Runs `tessera` with the fixture model and the given args.
fn with_model(args: &[&str]) -> assert_cmd::Command {
    let mut c = tessera();
    c.args(args).args(["--model", &model()]);
    c
}

/// A failing command prints exactly one `error:` line and no panic.
fn fails_with(mut cmd: assert_cmd::Command, needle: &str) {
    let out = cmd.assert().failure().get_output().clone();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "panic: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line, got:\n{err}");
    assert!(errors[0].contains(needle), "error should mention {needle:?}: {err}");
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn gen_writes_the_requested_size_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    with_model(&["gen", "a red cat", "--size", "8x6", "--seed", "7", "--cfg", "2", "-o", out.to_str().unwrap(), "-q"])
        .assert()
        .success();
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (8, 6));
    let text = tessera::image_io::read_png_text(&out).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.starts_with("a red cat\n") && params.contains("Seed: 7") && params.contains("CFG scale: 2"), "{params}");
    let record = tessera::metadata::ImageRecord::read_png(&out).unwrap();
    assert_eq!((record.seed, record.width, record.height, record.params.cfg), (7, 8, 6, 2.0));
    assert_eq!(record.model_hash.len(), 64);
}

#[test]
fn q8_weights_generate_and_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8.png");
    with_model(&["gen", "a red cat", "--size", "8x6", "--seed", "7", "--dtype", "q8", "--device", "cpu", "-o", out.to_str().unwrap(), "-q"])
        .assert()
        .success();
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (8, 6));
    assert_eq!(tessera::metadata::ImageRecord::read_png(&out).unwrap().dtype, "q8");
}

#[test]
fn from_reproduces_a_png_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    with_model(&["gen", "a blue dog", "--size", "8x8", "--top-k", "5", "--temperature", "0.9", "-o", a.to_str().unwrap(), "-q"])
        .assert()
        .success();
    with_model(&["gen", "--from", a.to_str().unwrap(), "-o", b.to_str().unwrap(), "-q"]).assert().success();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // A flag given explicitly overrides the recorded setting.
    let c = dir.path().join("c.png");
    with_model(&["gen", "--from", a.to_str().unwrap(), "--seed", "1", "-o", c.to_str().unwrap(), "-q"]).assert().success();
    assert_eq!(tessera::metadata::ImageRecord::read_png(&c).unwrap().seed, 1);
}

#[test]
fn same_seed_same_image_on_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.path().join(format!("t{threads}.png"));
        with_model(&["gen", "a cat", "--size", "8x8", "--seed", "11", "-o", out.to_str().unwrap(), "-q"])
            .env("RAYON_NUM_THREADS", threads)
            .assert()
            .success();
        outs.push(std::fs::read(out).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
}

#[test]
fn n_images_get_numbered_files_and_their_own_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let assert = with_model(&["gen", "a cat", "--size", "8x6", "-n", "3", "--seed", "40", "--json", "-o", out.to_str().unwrap(), "-q"])
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seed"], 40 + i as u64);
        assert!(l["tokens_per_sec"].as_f64().unwrap() > 0.0);
        let p = dir.path().join(format!("x-{i}.png"));
        assert_eq!(l["path"].as_str().unwrap(), p.to_str().unwrap());
        assert_eq!(tessera::metadata::ImageRecord::read_png(&p).unwrap().seed, 40 + i as u64);
    }
    assert_eq!(files_in(dir.path()), ["x-0.png", "x-1.png", "x-2.png"]);
}

#[test]
fn edit_with_mask_and_keep_rows() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.png");
    with_model(&["gen", "a cat", "--size", "8x8", "--seed", "3", "-o", src.to_str().unwrap(), "-q"]).assert().success();
    // Mask the right half (grid 4x4: columns 2 and 3).
    let mask = dir.path().join("mask.png");
    let m = image::RgbImage::from_fn(8, 8, |x, _| if x >= 4 { image::Rgb([255, 255, 255]) } else { image::Rgb([0, 0, 0]) });
    m.save(&mask).unwrap();
    let out = dir.path().join("out.png");
    with_model(&["edit", src.to_str().unwrap(), "a dog", "--mask", mask.to_str().unwrap(), "--seed", "9", "-o", out.to_str().unwrap(), "-q"])
        .assert()
        .success();
    // Which codes are kept is checked at the library level (tests/edit.rs); here, the command.
    let record = tessera::metadata::ImageRecord::read_png(&out).unwrap();
    assert_eq!(record.task, "edit");
    assert!(record.mask_sha256.is_some());
    assert_eq!(image::open(&out).unwrap().width(), 8);
    let keep = dir.path().join("keep.png");
    with_model(&["edit", src.to_str().unwrap(), "a dog", "--keep-rows", "2", "-o", keep.to_str().unwrap(), "-q"])
        .assert()
        .success();
    assert_eq!(tessera::metadata::ImageRecord::read_png(&keep).unwrap().keep_rows, Some(2));
}

#[test]
fn info_tokenize_reconstruct() {
    with_model(&["info"]).assert().success().stdout(predicate::str::contains("Emu3").and(predicate::str::contains("64 codes")));
    let out = with_model(&["info", "--json"]).assert().success().get_output().stdout.clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["vq"]["codebook_size"], 64);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.png");
    image::RgbImage::from_fn(10, 6, |x, y| image::Rgb([(x * 20) as u8, (y * 30) as u8, 90])).save(&src).unwrap();
    let out = with_model(&["tokenize", src.to_str().unwrap()]).assert().success().get_output().stdout.clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!((v["height"].as_u64(), v["width"].as_u64()), (Some(3), Some(5)));
    let rec = dir.path().join("rec.png");
    with_model(&["reconstruct", src.to_str().unwrap(), "-o", rec.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains("PSNR"));
    assert_eq!(image::open(&rec).unwrap().width(), 10);
}

#[cfg(unix)]
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // The read end is closed before the binary starts, so its first print fails for certain.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(assert_cmd::cargo::cargo_bin("tessera"))
        .env_remove("TESSERA_MODEL")
        .args(["info", "--model", &model()])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "expected no output on stderr, got:\n{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(13), "expected SIGPIPE, got {:?}", out.status);
}

#[test]
fn batch_resumes_after_a_kill_with_every_image_once() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    let mut lines = String::new();
    for i in 0..12 {
        lines.push_str(&format!("{{\"prompt\": \"a cat number {i}\", \"size\": \"30x30\"}}\n"));
    }
    std::fs::write(&prompts, lines).unwrap();
    let out = dir.path().join("out");
    let bin = assert_cmd::cargo::cargo_bin("tessera");
    let mut child = Command::new(&bin)
        .args(["batch", prompts.to_str().unwrap(), "--out-dir", out.to_str().unwrap(), "--batch-size", "1", "--model", &model(), "-q"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once the first images are listed.
    let manifest = out.join("manifest.jsonl");
    for _ in 0..400 {
        if std::fs::read_to_string(&manifest).map(|t| t.lines().count() >= 2).unwrap_or(false) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // No partial PNG, and the manifest only lists files that exist.
    let listed: Vec<String> = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["file"].as_str().unwrap().to_string())
        .collect();
    assert!(listed.len() < 12, "the run finished before it was killed; make the images bigger");
    for f in &listed {
        assert!(out.join(f).is_file());
    }
    tessera()
        .args(["batch", prompts.to_str().unwrap(), "--out-dir", out.to_str().unwrap(), "--model", &model(), "-q"])
        .assert()
        .success();
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut names: Vec<String> =
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["file"].as_str().unwrap().to_string()).collect();
    let pngs: Vec<String> = files_in(&out).into_iter().filter(|f| f.ends_with(".png")).collect();
    assert_eq!(pngs.len(), 12, "{pngs:?}");
    names.sort();
    names.dedup();
    assert_eq!(names, pngs);
    assert!(files_in(&out).iter().all(|f| !f.contains(".tmp")));
}

#[test]
fn batch_shards_split_the_work_and_names_stay_inside() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a red cat\na blue dog\n# comment\na green bird\n").unwrap();
    let mut all = Vec::new();
    for shard in ["0/2", "1/2"] {
        let out = dir.path().join(format!("s{}", &shard[..1]));
        with_model(&["batch", prompts.to_str().unwrap(), "--out-dir", out.to_str().unwrap(), "--shard", shard, "--size", "8x8", "-q"])
            .assert()
            .success();
        all.extend(files_in(&out).into_iter().filter(|f| f.ends_with(".png")));
    }
    all.sort();
    assert_eq!(all, ["a-blue-dog-l2.png", "a-green-bird-l4.png", "a-red-cat-l1.png"]);
    let evil = dir.path().join("evil.jsonl");
    std::fs::write(&evil, "{\"prompt\": \"x\", \"name\": \"../../../escape\", \"size\": \"8x8\"}\n").unwrap();
    let out = dir.path().join("e");
    with_model(&["batch", evil.to_str().unwrap(), "--out-dir", out.to_str().unwrap(), "-q"]).assert().success();
    assert!(out.join("escape.png").is_file());
    assert!(!dir.path().join("escape.png").exists());
}

#[test]
fn batch_reports_bad_lines_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"a cat\", \"size\": \"8x8\"}\n{\"prompt\": \n{\"prompt\": \"x\", \"size\": \"9x9\"}\n").unwrap();
    let out = dir.path().join("o");
    with_model(&["batch", prompts.to_str().unwrap(), "--out-dir", out.to_str().unwrap(), "-q"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("p.jsonl:2: malformed JSON line").and(predicate::str::contains("p.jsonl:3: size 9x9")));
    assert!(out.join("a-cat-l1.png").is_file());
}

#[test]
fn bad_input_gets_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let out = d("o.png");
    fails_with(with_model(&["gen", "", "-o", &out]), "prompt is empty");
    fails_with(with_model(&["gen", &"x".repeat(3000), "-o", &out]), "limit is");
    fails_with(with_model(&["gen", "a cat", "--size", "9x9", "-o", &out]), "valid sizes");
    fails_with(with_model(&["gen", "a cat", "--size", "huge", "-o", &out]), "WIDTHxHEIGHT");
    fails_with(with_model(&["gen", "a cat", "-n", "0", "-o", &out]), "0 is not in 1..=256");
    fails_with(with_model(&["gen", "a cat", "-o", &d("missing/o.png")]), "does not exist");
    fails_with(with_model(&["edit", &d("nope.png"), "x", "--keep-rows", "1", "-o", &out]), "no such file");
    std::fs::write(d("text.png"), "this is not an image").unwrap();
    fails_with(with_model(&["edit", &d("text.png"), "x", "--keep-rows", "1", "-o", &out]), "cannot decode");
    let mut png = Vec::new();
    image::RgbImage::new(8, 8).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    std::fs::write(d("trunc.png"), &png[..png.len() / 2]).unwrap();
    fails_with(with_model(&["reconstruct", &d("trunc.png"), "-o", &out]), "trunc.png");
    fails_with(with_model(&["batch", &d("none.jsonl"), "--out-dir", &d("b")]), "none.jsonl");
    let mut c = tessera();
    c.args(["gen", "a cat", "--model", &d("no-such-dir"), "-o", &out]);
    fails_with(c, "neither an existing directory nor a Hugging Face repo id");
    let empty = d("empty-model");
    std::fs::create_dir(&empty).unwrap();
    let mut c = tessera();
    c.args(["gen", "a cat", "--model", &empty, "-o", &out]);
    fails_with(c, "no config.json");
    let partial = PathBuf::from(d("partial-model"));
    std::fs::create_dir(&partial).unwrap();
    std::fs::copy(model() + "/config.json", partial.join("config.json")).unwrap();
    std::fs::copy(model() + "/tokenizer.json", partial.join("tokenizer.json")).unwrap();
    let mut c = tessera();
    c.args(["gen", "a cat", "--model", partial.to_str().unwrap(), "-o", &out]);
    fails_with(c, "no model.safetensors");
    if !cfg!(feature = "cuda") {
        fails_with(with_model(&["gen", "a cat", "--device", "cuda", "-o", &out]), "built without CUDA");
    }
    assert!(!dir.path().join("o.png").exists(), "no output on failure");
    assert!(files_in(dir.path()).iter().all(|f| !f.contains(".tmp")));
}

#[test]
fn every_flag_is_documented() {
    for cmd in ["gen", "edit", "batch", "info", "tokenize", "reconstruct"] {
        let out = tessera().args([cmd, "--help"]).assert().success().get_output().stdout.clone();
        let help = String::from_utf8_lossy(&out);
        for line in help.lines().filter(|l| l.trim_start().starts_with("--") || l.trim_start().starts_with('-')) {
            let flag = line.split_whitespace().next().unwrap();
            if flag == "-h," || flag == "--help" || flag == "-V," {
                continue;
            }
            // clap puts the doc on the same line, or on the next lines for long ones.
            let documented = line.split("  ").filter(|s| !s.trim().is_empty()).count() > 1
                || help.lines().skip_while(|l| *l != line).nth(1).is_some_and(|n| n.starts_with("          "));
            assert!(documented, "`tessera {cmd} {flag}` has no help text:\n{help}");
        }
    }
}

#[test]
fn preview_draws_rows_in_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.png");
    let assert = with_model(&["gen", "a cat", "--size", "8x8", "--preview", "--seed", "2", "-o", out.to_str().unwrap()])
        .env("TERM", "xterm-256color")
        .env_remove("KITTY_WINDOW_ID")
        .env_remove("TERM_PROGRAM")
        .assert()
        .success();
    let err = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    // Half-block cells with 24-bit colours, redrawn once per finished token row (4 rows).
    assert!(err.contains('▀') && err.contains("\x1b[38;2;"), "{err}");
    assert!(err.matches("\x1b[0m").count() >= 4, "{err}");
}

#[test]
fn the_shipped_model_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("red.png");
    let assert = tessera()
        .args(["gen", "a red circle", "--seed", "1", "-q", "--json", "-o", out.to_str().unwrap()])
        .assert()
        .success();
    let line: serde_json::Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    assert_eq!(line["codes"].as_array().unwrap().len(), 256);
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (128, 128));
    assert_eq!(tessera::metadata::ImageRecord::read_png(&out).unwrap().model, "default");
    tessera().args(["info"]).assert().success().stdout(predicate::str::contains("128x128 px (16x16 tokens)"));
    // "default", the name images record for it, names it too (as in `eval --model default`).
    tessera().args(["info", "--model", "default"]).assert().success().stdout(predicate::str::contains("128x128 px (16x16 tokens)"));
    // A folder in the shipped layout (weights/ + tokenizer/, what training exports) is a model too.
    tessera()
        .args(["info", "--model", env!("CARGO_MANIFEST_DIR")])
        .assert()
        .success()
        .stdout(predicate::str::contains("128x128 px (16x16 tokens)"));
    tessera()
        .args(["gen", "a red circle", "--size", "100x100", "-o", out.to_str().unwrap()])
        .assert()
        .failure()
        .stderr(predicate::str::contains("valid sizes: 128x128, 160x96, 96x160"));
}

#[test]
fn instruction_edit_on_the_shipped_model() {
    let dir = tempfile::tempdir().unwrap();
    let scene = dir.path().join("scene");
    tessera()
        .args(["world", "sample", "--count", "1", "--seed", "77", "--task", "edit", "--out", scene.to_str().unwrap()])
        .assert()
        .success();
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(scene.join("samples.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    let source = scene.join(line["source"].as_str().unwrap());
    let out = dir.path().join("edited.png");
    tessera()
        .args(["edit", source.to_str().unwrap(), line["instruction"].as_str().unwrap(), "--seed", "3", "-q", "-o", out.to_str().unwrap()])
        .assert()
        .success();
    let record = tessera::metadata::ImageRecord::read_png(&out).unwrap();
    assert_eq!((record.task.as_str(), record.width, record.height), ("edit", 128, 128));
    assert_eq!(record.prompt, line["instruction"].as_str().unwrap());
    // An instruction edit samples with the model's own guidance for edits, not the t2i one;
    // a --cfg flag overrides both.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tessera::model::shipped_model_dir().join("weights/config.json")).unwrap())
            .unwrap();
    let (t2i_cfg, edit_cfg) =
        (config["tessera"]["guidance_scale"].as_f64().unwrap(), config["tessera"]["edit_guidance_scale"].as_f64().unwrap());
    assert_ne!(t2i_cfg, edit_cfg);
    assert_eq!(record.params.cfg, edit_cfg);
    let flagged = dir.path().join("flagged.png");
    tessera()
        .args(["edit", source.to_str().unwrap(), line["instruction"].as_str().unwrap(), "--seed", "3", "--cfg", "2.5", "-q"])
        .args(["-o", flagged.to_str().unwrap()])
        .assert()
        .success();
    assert_eq!(tessera::metadata::ImageRecord::read_png(&flagged).unwrap().params.cfg, 2.5);
}
