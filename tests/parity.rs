//! Numeric parity with transformers on tiny random Emu3 checkpoints.
//!
//! The fixtures in tests/fixtures/ (config, weights, tokenizer, reference outputs) are written
//! by `scripts/make_fixtures.py` with transformers + torch on the CPU; see
//! tests/fixtures/README.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use tessera::generate::{ImageJob, SamplerPlace, generate, generate_with};
use tessera::model::{LoadOptions, Model, ModelFiles};
use tessera::sampler::SamplingParams;

const FIXTURES: [&str; 2] = ["tiny-t4", "tiny-t1"];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load(name: &str) -> (Model, HashMap<String, Tensor>, serde_json::Value) {
    let dir = fixture_dir(name);
    let model = Model::load(ModelFiles::from_dir(&dir).unwrap(), LoadOptions::default()).unwrap();
    let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    (model, reference, json)
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().iter().map(|&x| x as u32).collect()
}

/// ||a - b|| / ||b||
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    num / den
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn lm_logits_prefill_and_cached_steps() {
    for name in FIXTURES {
        let (model, r, _) = load(name);
        let prompt = r["lm_prompt_ids"].to_dtype(DType::U32).unwrap();
        let mut cache = model.text.new_cache(vec![0], 64);
        let hidden = model.text.forward_hidden(&prompt, &mut cache).unwrap();
        let logits = model.text.logits(&hidden).unwrap();
        let e = rel_err(&logits, &r["lm_prefill_logits"]);
        println!("{name}: prefill logits relative error {e:.2e}");
        assert!(e < 1e-4, "{name}: prefill logits relative error {e}");
        let steps = ids(&r["lm_step_ids"]);
        for (i, &t) in steps.iter().enumerate() {
            let x = Tensor::new(&[[t]], &Device::Cpu).unwrap();
            let l = model.text.forward_last(&x, &mut cache).unwrap();
            let e = rel_err(&l.squeeze(0).unwrap(), &r["lm_step_logits"].i(i).unwrap());
            println!("{name}: cached step {i} logits relative error {e:.2e}");
            assert!(e < 1e-4, "{name}: step {i} logits relative error {e}");
        }
    }
}

#[test]
fn tokenizer_builds_the_reference_prompts() {
    for name in FIXTURES {
        let (model, r, json) = load(name);
        let p = &model.prompter;
        let mut lm = vec![p.vocab.bos];
        lm.extend(p.encode_text(json["lm"]["prompt"].as_str().unwrap()).unwrap());
        assert_eq!(lm, ids(&r["lm_prompt_ids"]), "{name}: lm prompt ids");
        let g = &json["generation"];
        let (h, w) = (g["grid"][0].as_u64().unwrap() as usize, g["grid"][1].as_u64().unwrap() as usize);
        let cond = p.t2i_prompt(g["caption"].as_str().unwrap(), h, w).unwrap();
        assert_eq!(cond, ids(&r["gen_cond_ids"]), "{name}: generation prompt ids");
        let neg = p.t2i_prompt(g["negative_prompt"].as_str().unwrap(), h, w).unwrap();
        assert_eq!(neg, ids(&r["gen_neg_ids"]), "{name}: negative prompt ids");
    }
}

#[test]
fn vq_encode_non_square_gives_identical_codes() {
    for name in FIXTURES {
        let (model, r, _) = load(name);
        let x = &r["vq_encode_input"];
        let latents = model.vq.encode_latents(x).unwrap();
        let e = rel_err(&latents, &r["vq_encode_latents"]);
        println!("{name}: pre-quantization latents relative error {e:.2e}");
        assert!(e < 1e-4, "{name}: pre-quantization latents relative error {e}");
        let codes = model.vq.encode(x).unwrap();
        assert_eq!(codes.dims(), r["vq_encode_codes"].dims(), "{name}: code grid shape");
        assert_eq!(ids(&codes), ids(&r["vq_encode_codes"]), "{name}: codes");
    }
}

#[test]
fn vq_decode_non_square_matches_pixels() {
    for name in FIXTURES {
        let (model, r, _) = load(name);
        let codes = r["vq_decode_codes"].to_dtype(DType::U32).unwrap();
        let pixels = model.vq.decode(&codes).unwrap();
        assert_eq!(pixels.dims(), r["vq_decode_pixels"].dims());
        let m = max_abs(&pixels, &r["vq_decode_pixels"]);
        println!("{name}: decode max abs pixel error {m:.2e}");
        assert!(m < 1e-3, "{name}: decode max abs pixel error {m}");
    }
}

fn reference_job(r: &HashMap<String, Tensor>, json: &serde_json::Value, seed: u64) -> ImageJob {
    let g = &json["generation"];
    let grid = (g["grid"][0].as_u64().unwrap() as usize, g["grid"][1].as_u64().unwrap() as usize);
    ImageJob {
        prompt: ids(&r["gen_cond_ids"]),
        negative: ids(&r["gen_neg_ids"]),
        grid,
        forced: None,
        params: SamplingParams::greedy(g["guidance_scale"].as_f64().unwrap()),
        seed,
    }
}

#[test]
fn greedy_cfg_generation_is_token_for_token_identical() {
    for name in FIXTURES {
        let (model, r, json) = load(name);
        let job = reference_job(&r, &json, 0);
        let expected = ids(&r["gen_output_ids"])[job.prompt.len()..].to_vec();
        let (out, stats) = generate(&model.text, &model.prompter.vocab, std::slice::from_ref(&job), &mut |_| {}).unwrap();
        assert_eq!(out[0].tokens, expected, "{name}: generated tokens");
        assert_eq!(out[0].codes, ids(&r["gen_image_codes"]), "{name}: image codes");
        assert!(stats.steps > 0);
        // The decoded image of the generated codes.
        let (h, w) = job.grid;
        let pixels = model.vq.decode(&Tensor::from_vec(out[0].codes.clone(), (1, h, w), &Device::Cpu).unwrap()).unwrap();
        let m = max_abs(&pixels, &r["gen_image_pixels"]);
        assert!(m < 1e-3, "{name}: generated image max abs pixel error {m}");
    }
}

#[test]
fn batched_rows_match_single_rows() {
    // Rows of different prompt lengths share one padded batch; each must equal its solo run.
    let (model, r, json) = load("tiny-t4");
    let a = reference_job(&r, &json, 1);
    let mut b = a.clone();
    b.prompt = model.prompter.t2i_prompt("a blue square", a.grid.0, a.grid.1).unwrap();
    b.params = SamplingParams { cfg: 2.0, temperature: 1.0, top_k: 10, top_p: 1.0 };
    b.seed = 99;
    let vocab = &model.prompter.vocab;
    let (both, _) = generate(&model.text, vocab, &[a.clone(), b.clone()], &mut |_| {}).unwrap();
    let (solo_a, _) = generate(&model.text, vocab, &[a], &mut |_| {}).unwrap();
    let (solo_b, _) = generate(&model.text, vocab, &[b], &mut |_| {}).unwrap();
    assert_eq!(both[0].tokens, solo_a[0].tokens);
    assert_eq!(both[1].tokens, solo_b[0].tokens);
}

#[test]
fn device_side_guidance_gives_the_host_tokens() {
    // The device path (guidance and greedy argmax as tensor ops) must draw exactly what the host
    // path draws; on the CPU both run, so the tokens must be identical.
    for name in ["tiny-t4", "tiny-t1"] {
        let (model, r, json) = load(name);
        let vocab = &model.prompter.vocab;
        let greedy = reference_job(&r, &json, 1);
        let mut sampled = greedy.clone();
        sampled.params = SamplingParams { cfg: 2.5, temperature: 1.0, top_k: 10, top_p: 0.9 };
        sampled.seed = 7;
        let mut unguided = greedy.clone();
        unguided.params = SamplingParams { cfg: 1.0, temperature: 0.8, top_k: 0, top_p: 1.0 };
        unguided.seed = 3;
        // All greedy (one guided, one not): the codes stay on the device between steps.
        let mut greedy_unguided = greedy.clone();
        greedy_unguided.params.cfg = 1.0;
        let all_greedy = vec![greedy.clone(), greedy_unguided];
        for jobs in [vec![greedy.clone()], all_greedy, vec![greedy.clone(), sampled.clone(), unguided.clone()]] {
            let run = |place| generate_with(&model.text, vocab, &jobs, place, &mut |_| {}).unwrap().0;
            let (host, device) = (run(SamplerPlace::Host), run(SamplerPlace::Device));
            for (h, d) in host.iter().zip(&device) {
                assert_eq!(h.tokens, d.tokens, "{name}: {} jobs", jobs.len());
            }
        }
    }
}
