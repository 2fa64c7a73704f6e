//! Checkpoint loading: both tensor-name schemes, sharded files, f16/bf16 on disk, and strict
//! errors that name every missing, mis-shaped or unexpected tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tessera::model::{LoadOptions, Model, ModelFiles};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-t4")
}

fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap()
}

/// A model dir in a temp folder with the fixture's config and tokenizer and the given tensors.
fn dir_with(tensors: &HashMap<String, Tensor>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    candle_core::safetensors::save(tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load(dir: &Path) -> tessera::Result<Model> {
    Model::load(ModelFiles::from_dir(dir)?, LoadOptions::default())
}

fn prefill_logits(model: &Model) -> Tensor {
    let ids = Tensor::new(&[[164u32, 5, 7, 9, 167, 60, 61, 166]], &Device::Cpu).unwrap();
    let mut cache = model.text.new_cache(vec![0], 16);
    let h = model.text.forward_hidden(&ids, &mut cache).unwrap();
    model.text.logits(&h).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    d / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
}

fn error_of(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn in_memory_names_load_like_on_disk_names() {
    let reference = prefill_logits(&load(&fixture()).unwrap());
    let renamed: HashMap<String, Tensor> = tensors()
        .into_iter()
        .map(|(k, v)| {
            let k = if let Some(r) = k.strip_prefix("text_model.model.") {
                format!("model.text_model.{r}")
            } else if let Some(r) = k.strip_prefix("text_model.lm_head.") {
                format!("lm_head.{r}")
            } else if let Some(r) = k.strip_prefix("vqmodel.") {
                format!("model.vqmodel.{r}")
            } else {
                k
            };
            (k, v)
        })
        .collect();
    assert!(renamed.keys().any(|k| k.starts_with("model.text_model.")));
    let dir = dir_with(&renamed);
    assert_eq!(rel_err(&prefill_logits(&load(dir.path()).unwrap()), &reference), 0.0);
}

#[test]
fn sharded_checkpoint_with_index_loads() {
    let reference = prefill_logits(&load(&fixture()).unwrap());
    let all = tensors();
    let dir = dir_with(&HashMap::new());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let shard: HashMap<String, Tensor> = part.iter().map(|n| ((*n).clone(), all[*n].clone())).collect();
        candle_core::safetensors::save(&shard, dir.path().join(&file)).unwrap();
        for n in part.iter() {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let model = load(dir.path()).unwrap();
    assert_eq!(rel_err(&prefill_logits(&model), &reference), 0.0);
}

#[test]
fn half_precision_weights_load_and_stay_close() {
    let reference = prefill_logits(&load(&fixture()).unwrap());
    for dtype in [DType::F16, DType::BF16] {
        let converted: HashMap<String, Tensor> = tensors()
            .into_iter()
            .map(|(k, v)| {
                let v = if v.dtype() == DType::F32 { v.to_dtype(dtype).unwrap() } else { v };
                (k, v)
            })
            .collect();
        let dir = dir_with(&converted);
        let model = load(dir.path()).unwrap();
        let e = rel_err(&prefill_logits(&model), &reference);
        let tol = if dtype == DType::F16 { 5e-3 } else { 3e-2 };
        assert!(e < tol, "{dtype:?} weights: relative error {e}");
        assert!(e > 0.0, "{dtype:?} weights should change the logits a little");
    }
}

#[test]
fn every_problem_is_named_in_one_error() {
    let mut t = tensors();
    t.remove("text_model.model.norm.weight").unwrap();
    t.remove("vqmodel.quantize.embedding.weight").unwrap();
    let w = t["text_model.model.layers.0.mlp.up_proj.weight"].narrow(0, 0, 10).unwrap();
    t.insert("text_model.model.layers.0.mlp.up_proj.weight".into(), w);
    t.insert("vqmodel.encoder.extra.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    let dir = dir_with(&t);
    let msg = error_of(dir.path());
    for needle in [
        "2 missing tensors",
        "text_model.model.norm.weight",
        "vqmodel.quantize.embedding.weight",
        "1 tensors with the wrong shape",
        "text_model.model.layers.0.mlp.up_proj.weight: expected [64, 32], found [10, 32]",
        "1 unexpected tensors",
        "vqmodel.encoder.extra.weight",
    ] {
        assert!(msg.contains(needle), "error should mention {needle:?}:\n{msg}");
    }
}

#[test]
fn incomplete_model_dirs_say_what_is_missing() {
    let empty = tempfile::tempdir().unwrap();
    assert!(error_of(empty.path()).contains("no config.json"));
    let dir = dir_with(&tensors());
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert!(error_of(dir.path()).contains("tokenizer.json"));
    let dir = dir_with(&tensors());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(error_of(dir.path()).contains("no model.safetensors"));
    let dir = dir_with(&tensors());
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    assert!(error_of(dir.path()).contains("invalid JSON"));
}
