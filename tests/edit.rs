//! Edits force the kept codes and sample the rest, through the one decode loop.

use std::path::Path;

use tessera::model::{LoadOptions, Model, ModelFiles};
use tessera::pipeline::{EditMode, EditRequest};
use tessera::sampler::SamplingParams;

fn model() -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-t4");
    Model::load(ModelFiles::from_dir(&dir).unwrap(), LoadOptions::default()).unwrap()
}

fn source(m: &Model) -> image::RgbImage {
    // A source image whose codes we know: decode a fixed code grid.
    let codes: Vec<u32> = (0..16).map(|i| (i * 7 % 64) as u32).collect();
    m.decode_codes(&[codes], 4, 4).unwrap().swap_remove(0)
}

fn run(m: &Model, mode: EditMode, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let src = source(m);
    let (_, _, src_codes) = m.encode_image(&src).unwrap();
    let req = EditRequest {
        prompt: "a dog".into(),
        negative: None,
        source: src,
        mode,
        params: SamplingParams { cfg: 3.0, temperature: 1.0, top_k: 0, top_p: 1.0 },
        seed,
    };
    let job = m.edit_job(&req).unwrap();
    let (_, codes, _) = m.run_jobs(&[job], &mut |_| {}).unwrap();
    (src_codes, codes.into_iter().next().unwrap())
}

#[test]
fn mask_keeps_the_source_codes_outside() {
    let m = model();
    let mask: Vec<bool> = (0..16).map(|i| i % 4 >= 2).collect(); // right half regenerated
    let mut changed = 0;
    for seed in 0..4 {
        let (src, out) = run(&m, EditMode::Mask(mask.clone()), seed);
        for i in 0..16 {
            if !mask[i] {
                assert_eq!(out[i], src[i], "cell {i} outside the mask must be kept");
            } else if out[i] != src[i] {
                changed += 1;
            }
        }
    }
    assert!(changed > 0, "the masked cells are sampled, not copied");
}

#[test]
fn keep_rows_keeps_the_top_rows() {
    let m = model();
    let (src, out) = run(&m, EditMode::KeepRows(3), 5);
    assert_eq!(&out[..12], &src[..12]);
    let (_, other) = run(&m, EditMode::KeepRows(3), 6);
    assert_eq!(&other[..12], &src[..12]);
}

#[test]
fn instruction_edits_need_a_model_trained_for_them() {
    let m = model();
    let req = EditRequest {
        prompt: "make it blue".into(),
        negative: None,
        source: source(&m),
        mode: EditMode::Instruction,
        params: SamplingParams::default(),
        seed: 0,
    };
    let err = m.edit_job(&req).unwrap_err().to_string();
    assert!(err.contains("not trained for instruction edits"), "{err}");
}
