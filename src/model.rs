//! A loaded Emu3 checkpoint: where its files are (a directory, a Hugging Face repo, or the
//! model shipped in this repository), and the language model, VQ-VAE and tokenizer built
//! from them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use sha2::{Digest, Sha256};

use crate::config::Emu3Config;
use crate::error::{Error, Result};
use crate::image_io;
use crate::text::Emu3TextModel;
use crate::text::linear::CpuWeights;
use crate::tokens::{Prompter, Vocabulary};
use crate::vq::Emu3VqVae;
use crate::weights::{WeightSource, checkpoint_files};

/// The files of one checkpoint.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// How the user named it (a path, a repo id, or "default").
    pub name: String,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
}

/// The model shipped in this repository: `weights/` and `tokenizer/` at the package root.
pub fn shipped_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl ModelFiles {
    /// `spec` is a checkpoint directory, a root in the shipped layout (`weights/` +
    /// `tokenizer/`), a Hugging Face repo id (`owner/name`), or `None` (or `"default"`, the name
    /// images record for it, unless a directory of that name exists) for the shipped default model.
    pub fn resolve(spec: Option<&str>) -> Result<Self> {
        match spec {
            None => Self::shipped(&shipped_model_dir()),
            Some("default") if !Path::new("default").exists() => Self::shipped(&shipped_model_dir()),
            Some(s) => {
                let path = Path::new(s);
                if path.exists() && !path.join("config.json").exists() && path.join("weights").join("config.json").is_file() {
                    // A root in the shipped layout (weights/ + tokenizer/), e.g. a training export.
                    let mut files = Self::shipped(path)?;
                    files.name = s.to_string();
                    Ok(files)
                } else if path.exists() {
                    Self::from_dir(path)
                } else if looks_like_repo_id(s) {
                    Self::from_hub(s)
                } else {
                    Err(Error::Checkpoint(format!(
                        "model {s:?} is neither an existing directory nor a Hugging Face repo id (owner/name)"
                    )))
                }
            }
        }
    }

    /// The shipped layout: `root/weights/{config.json,*.safetensors}` + `root/tokenizer/tokenizer.json`.
    pub fn shipped(root: &Path) -> Result<Self> {
        let weights_dir = root.join("weights");
        if !weights_dir.join("config.json").is_file() {
            return Err(Error::Checkpoint(format!(
                "the default model is not at {} (run from a clone of the Tessera repository, or pass --model DIR)",
                weights_dir.display()
            )));
        }
        let mut files = Self::from_dir_with_tokenizer(&weights_dir, &root.join("tokenizer").join("tokenizer.json"))?;
        files.name = "default".into();
        Ok(files)
    }

    /// A transformers checkpoint directory: `config.json`, `tokenizer.json` and safetensors.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_with_tokenizer(dir, &dir.join("tokenizer.json"))
    }

    fn from_dir_with_tokenizer(dir: &Path, tokenizer: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint(format!("model path {} is not a directory", dir.display())));
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(Error::Checkpoint(format!(
                "{} has no config.json (expected a transformers Emu3 checkpoint directory)",
                dir.display()
            )));
        }
        if !tokenizer.is_file() {
            return Err(Error::Checkpoint(format!(
                "{} is missing: the model directory needs its tokenizer.json",
                tokenizer.display()
            )));
        }
        Ok(Self {
            name: dir.display().to_string(),
            config,
            weights: checkpoint_files(dir)?,
            tokenizer: tokenizer.to_path_buf(),
        })
    }

    /// Fetch a checkpoint from the Hugging Face Hub through hf-hub's cache (`HF_HOME`);
    /// files already in the cache are used without a network request.
    pub fn from_hub(repo_id: &str) -> Result<Self> {
        let repo = hf_hub::Repo::model(repo_id.to_string());
        let cache = hf_hub::Cache::from_env().repo(repo.clone());
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        let hub_err = |file: &str, e: String| {
            Error::Checkpoint(format!("cannot fetch {file} of Hugging Face repo {repo_id}: {e}"))
        };
        let api = if offline {
            None
        } else {
            Some(hf_hub::api::sync::Api::new().map_err(|e| hub_err("(api)", e.to_string()))?.repo(repo))
        };
        let get = |file: &str| -> Result<PathBuf> {
            if let Some(p) = cache.get(file) {
                return Ok(p);
            }
            match &api {
                Some(api) => api.get(file).map_err(|e| hub_err(file, e.to_string())),
                None => Err(hub_err(file, "not in the local cache and HF_HUB_OFFLINE is set".into())),
            }
        };
        let config = get("config.json")?;
        let tokenizer = get("tokenizer.json")?;
        let weights = match get("model.safetensors.index.json") {
            Ok(index) => {
                let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|source| Error::Json { path: index.clone(), source })?;
                let mut shards: Vec<String> = json["weight_map"]
                    .as_object()
                    .map(|m| m.values().filter_map(|v| v.as_str().map(String::from)).collect())
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                shards.iter().map(|s| get(s)).collect::<Result<Vec<_>>>()?
            }
            Err(_) => vec![get("model.safetensors")?],
        };
        Ok(Self { name: repo_id.to_string(), config, weights, tokenizer })
    }
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !p.starts_with('.')
        })
}

/// Where and in which precision to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of the language model.
    pub dtype: DType,
    /// Compute dtype of the VQ-VAE.
    pub vq_dtype: DType,
    /// How the language model's projections hold f32 weights on the CPU (panels, or Q8_0).
    pub cpu_weights: CpuWeights,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, vq_dtype: DType::F32, cpu_weights: CpuWeights::FromEnv }
    }
}

/// A loaded checkpoint.
pub struct Model {
    pub config: Emu3Config,
    pub text: Emu3TextModel,
    pub vq: Emu3VqVae,
    pub prompter: Prompter,
    pub files: ModelFiles,
    pub options: LoadOptions,
}

impl Model {
    pub fn load(files: ModelFiles, options: LoadOptions) -> Result<Self> {
        let text = std::fs::read_to_string(&files.config).map_err(|e| Error::io(&files.config, e))?;
        let config: Emu3Config =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: files.config.clone(), source })?;
        if config.model_type != "emu3" {
            return Err(Error::Checkpoint(format!(
                "{}: model_type is {:?}, expected \"emu3\"",
                files.config.display(),
                config.model_type
            )));
        }
        let bad = |e: String| Error::Checkpoint(format!("{}: {e}", files.config.display()));
        config.text_config.validate().map_err(bad)?;
        config.vq_config.validate().map_err(bad)?;
        let vocab = Vocabulary::from_map(&config.vocabulary_map)?;
        if vocab.max_id() as usize >= config.text_config.vocab_size {
            return Err(bad(format!(
                "vocabulary_map uses id {} but text_config.vocab_size is {}",
                vocab.max_id(),
                config.text_config.vocab_size
            )));
        }
        if vocab.codebook_size() != config.vq_config.codebook_size {
            return Err(bad(format!(
                "vocabulary_map has {} visual tokens but vq_config.codebook_size is {}",
                vocab.codebook_size(),
                config.vq_config.codebook_size
            )));
        }
        let prompter = Prompter::new(&files.tokenizer, vocab)?;
        let source = WeightSource::open(&files.weights)?;
        let dev = &options.device;
        let text_model = Emu3TextModel::new(&config.text_config, source.var_builder(options.dtype, dev), options.cpu_weights)
            .map_err(|e| load_error(&source, e))?;
        let vq = Emu3VqVae::new(&config.vq_config, source.var_builder(options.vq_dtype, dev).pp("vqmodel"))
            .map_err(|e| load_error(&source, e))?;
        source.finish(&[""])?;
        Ok(Self { config, text: text_model, vq, prompter, files, options })
    }

    pub fn device(&self) -> &Device {
        &self.options.device
    }

    /// Pixels per token along each axis.
    pub fn spatial_factor(&self) -> usize {
        self.vq.spatial_factor()
    }

    /// The sampling settings the model recommends (`config.json`'s `tessera` block: guidance,
    /// temperature, top-k), else guidance 3, temperature 1 and every candidate. What `gen`,
    /// `edit`, `batch` and `eval` use when no flag overrides them.
    pub fn recommended_params(&self) -> crate::sampler::SamplingParams {
        let meta = self.config.tessera.as_ref();
        crate::sampler::SamplingParams {
            cfg: meta.and_then(|m| m.cfg).unwrap_or(3.0),
            temperature: meta.and_then(|m| m.temperature).unwrap_or(1.0),
            top_k: meta.and_then(|m| m.top_k).unwrap_or(0),
            top_p: 1.0,
        }
    }

    /// The settings for instruction edits: `recommended_params` with the block's
    /// `edit_guidance_scale` as the guidance, where the model gives one.
    pub fn recommended_edit_params(&self) -> crate::sampler::SamplingParams {
        let base = self.recommended_params();
        let edit_cfg = self.config.tessera.as_ref().and_then(|m| m.edit_cfg);
        crate::sampler::SamplingParams { cfg: edit_cfg.unwrap_or(base.cfg), ..base }
    }

    /// The token grids the model was trained on (Tessera's metadata), if it says.
    pub fn trained_grids(&self) -> Vec<(usize, usize)> {
        self.config.tessera.as_ref().map(|t| t.grids.iter().map(|g| (g[0], g[1])).collect()).unwrap_or_default()
    }

    /// Image -> code grid `(h, w)` and the codes row-major. The image must be a multiple of
    /// the spatial factor in both sides.
    pub fn encode_image(&self, img: &RgbImage) -> Result<(usize, usize, Vec<u32>)> {
        let s = self.spatial_factor() as u32;
        let (w, h) = img.dimensions();
        if w % s != 0 || h % s != 0 {
            return Err(Error::Invalid(format!("image size {w}x{h} is not a multiple of {s}")));
        }
        let x = image_io::image_to_tensor(img, self.device())?;
        let codes = self.vq.encode(&x)?;
        let (_, gh, gw) = codes.dims3()?;
        Ok((gh, gw, codes.flatten_all()?.to_vec1::<u32>()?))
    }

    /// Code grids (all `h` x `w`) -> images.
    pub fn decode_codes(&self, grids: &[Vec<u32>], h: usize, w: usize) -> Result<Vec<RgbImage>> {
        if grids.is_empty() {
            return Ok(Vec::new());
        }
        let flat: Vec<u32> = grids.iter().flatten().copied().collect();
        let codes = Tensor::from_vec(flat, (grids.len(), h, w), self.device())?;
        let pixels = self.vq.decode(&codes)?;
        (0..grids.len()).map(|i| image_io::tensor_to_image(&pixels.get(i)?)).collect()
    }

    /// SHA-256 over config.json and every weight file, hex: the model's identity in metadata.
    pub fn content_hash(&self) -> Result<String> {
        let mut hasher = Sha256::new();
        for path in std::iter::once(&self.files.config).chain(self.files.weights.iter()) {
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            std::io::copy(&mut f, &mut hasher).map_err(|e| Error::io(path, e))?;
        }
        Ok(format!("{:x}", hasher.finalize()))
    }
}

fn load_error(source: &WeightSource, e: candle_core::Error) -> Error {
    // A construction error can stem from a listed tensor problem; report those first.
    match source.finish(&[""]) {
        Err(listed) => listed,
        Ok(()) => Error::Checkpoint(format!("building the model: {e}")),
    }
}
