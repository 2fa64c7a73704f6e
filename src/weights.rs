//! Strict, memory-mapped loading of safetensors checkpoints.
//!
//! Modules ask for tensors by their canonical name (the on-disk layout that `save_pretrained`
//! writes: `text_model.model.*`, `text_model.lm_head.*`, `vqmodel.*`); the in-memory spelling
//! of transformers >= 4.52 (`model.text_model.*`, `lm_head.*`, `model.vqmodel.*`) is accepted too.
//! A missing, mis-shaped or unused tensor does not fail at once: loading goes on with a
//! zero-sized stand-in, and [`WeightSource::finish`] then reports every problem in one error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// Buffers that transformers saves but inference never reads.
const IGNORED_SUFFIXES: &[&str] = &["num_batches_tracked", "rotary_emb.inv_freq"];

/// Map a tensor name as stored on disk to the canonical (legacy on-disk) spelling.
pub fn canonical_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.text_model.") {
        format!("text_model.model.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.vqmodel.") {
        format!("vqmodel.{rest}")
    } else if let Some(rest) = name.strip_prefix("lm_head.") {
        format!("text_model.lm_head.{rest}")
    } else {
        name.to_string()
    }
}

/// The safetensors files of a model directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: index.clone(), source })?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
            Error::Checkpoint(format!("{}: no \"weight_map\" object", index.display()))
        })?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let mut out = Vec::new();
        for f in files {
            let p = dir.join(f);
            if !p.is_file() {
                return Err(Error::Checkpoint(format!(
                    "shard {} named in {} is missing",
                    p.display(),
                    index.display()
                )));
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::Checkpoint(format!(
        "{}: no model.safetensors or model.safetensors.index.json (is this an Emu3 checkpoint directory?)",
        dir.display()
    )))
}

#[derive(Default)]
struct Ledger {
    used: BTreeSet<String>,
    missing: BTreeMap<String, Vec<usize>>,
    mis_shaped: BTreeMap<String, (Vec<usize>, Vec<usize>)>,
}

/// The tensors of one checkpoint, plus a ledger of what the model asked for.
#[derive(Clone)]
pub struct WeightSource {
    st: Arc<MmapedSafetensors>,
    /// canonical name -> stored name
    names: Arc<HashMap<String, String>>,
    ledger: Arc<Mutex<Ledger>>,
}

impl WeightSource {
    /// Memory-map the given safetensors files.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        // Safety: the files are mapped read-only; like every mmap-based loader we assume
        // they are not truncated while the model is alive.
        let st = unsafe { MmapedSafetensors::multi(files) }
            .map_err(|e| Error::Checkpoint(format!("reading safetensors: {e}")))?;
        let names = st
            .tensors()
            .into_iter()
            .map(|(name, _)| (canonical_name(&name), name))
            .collect();
        Ok(Self { st: Arc::new(st), names: Arc::new(names), ledger: Arc::default() })
    }

    /// A VarBuilder over this source (canonical names), producing `dtype` tensors on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Number of stored tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Stored dtype of one tensor (canonical name).
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        let stored = self.names.get(name)?;
        let view = self.st.get(stored).ok()?;
        DType::try_from(view.dtype()).ok()
    }

    /// Fail with one error that lists every missing, mis-shaped and unexpected tensor of the
    /// modules built so far, restricted to names under `prefixes`.
    pub fn finish(&self, prefixes: &[&str]) -> Result<()> {
        let ledger = self.ledger.lock().expect("weight ledger poisoned");
        let under = |n: &str| prefixes.iter().any(|p| n.starts_with(p));
        let mut unexpected: Vec<&String> = self
            .names
            .keys()
            .filter(|n| under(n) && !ledger.used.contains(*n))
            .filter(|n| !IGNORED_SUFFIXES.iter().any(|s| n.ends_with(s)))
            .collect();
        unexpected.sort();
        if ledger.missing.is_empty() && ledger.mis_shaped.is_empty() && unexpected.is_empty() {
            return Ok(());
        }
        let mut msg = String::from("checkpoint does not match its config.json:");
        const SHOW: usize = 20;
        let list = |msg: &mut String, title: &str, items: Vec<String>| {
            if items.is_empty() {
                return;
            }
            msg.push_str(&format!("\n  {} {title}:", items.len()));
            for item in items.iter().take(SHOW) {
                msg.push_str(&format!("\n    {item}"));
            }
            if items.len() > SHOW {
                msg.push_str(&format!("\n    ... and {} more", items.len() - SHOW));
            }
        };
        list(
            &mut msg,
            "missing tensors",
            ledger.missing.iter().map(|(n, s)| format!("{n} {s:?}")).collect(),
        );
        list(
            &mut msg,
            "tensors with the wrong shape",
            ledger
                .mis_shaped
                .iter()
                .map(|(n, (want, got))| format!("{n}: expected {want:?}, found {got:?}"))
                .collect(),
        );
        list(&mut msg, "unexpected tensors", unexpected.iter().map(|n| n.to_string()).collect());
        Err(Error::Checkpoint(msg))
    }

    fn stand_in(s: &Shape, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        // A broadcast scalar: the right shape without allocating it.
        Tensor::zeros((), dtype, dev)?.broadcast_as(s.clone())
    }
}

impl SimpleBackend for WeightSource {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut ledger = self.ledger.lock().expect("weight ledger poisoned");
        let Some(stored) = self.names.get(name) else {
            ledger.missing.insert(name.to_string(), s.dims().to_vec());
            return Self::stand_in(&s, dtype, dev);
        };
        ledger.used.insert(name.to_string());
        let view = self.st.get(stored)?;
        if view.shape() != s.dims() {
            ledger.mis_shaped.insert(name.to_string(), (s.dims().to_vec(), view.shape().to_vec()));
            return Self::stand_in(&s, dtype, dev);
        }
        drop(ledger);
        self.st.load(stored, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(stored) = self.names.get(name) else {
            candle_core::bail!("cannot find tensor {name}")
        };
        self.ledger.lock().expect("weight ledger poisoned").used.insert(name.to_string());
        self.st.load(stored, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_name_schemes_map_to_one() {
        assert_eq!(canonical_name("model.text_model.norm.weight"), "text_model.model.norm.weight");
        assert_eq!(canonical_name("text_model.model.norm.weight"), "text_model.model.norm.weight");
        assert_eq!(canonical_name("lm_head.weight"), "text_model.lm_head.weight");
        assert_eq!(canonical_name("model.vqmodel.quant_conv.conv.weight"), "vqmodel.quant_conv.conv.weight");
        assert_eq!(canonical_name("vqmodel.quant_conv.conv.weight"), "vqmodel.quant_conv.conv.weight");
    }
}
