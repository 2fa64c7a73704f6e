//! `config.json` of a Hugging Face `transformers` Emu3 checkpoint (`model_type: "emu3"`).
//!
//! The structs mirror the file field for field. Every field has the default of
//! `transformers`' `Emu3TextConfig` / `Emu3VQVAEConfig`, because the hub's `*-hf` configs are
//! sparse (BAAI/Emu3-Gen-hf's `text_config` names little more than its model type).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The whole `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Emu3Config {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default)]
    pub vq_config: VqConfig,
    /// Token string -> id, for every special and visual token.
    #[serde(default)]
    pub vocabulary_map: HashMap<String, u32>,
    /// Tessera's own metadata (supported grids, sequence layouts); absent in BAAI checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tessera: Option<TesseraMeta>,
}

fn default_model_type() -> String {
    "emu3".to_string()
}

/// `Emu3TextConfig`: the Llama-style decoder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// transformers 4.x spelling; 5.x moved it into `rope_parameters`.
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeParameters>,
    pub rope_parameters: Option<RopeParameters>,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub attention_dropout: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 184622,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            head_dim: None,
            hidden_act: "silu".to_string(),
            max_position_embeddings: 9216,
            rms_norm_eps: 1e-5,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            attention_bias: false,
            mlp_bias: false,
            attention_dropout: 0.1,
            pad_token_id: Some(151643),
            bos_token_id: Some(151849),
            eos_token_id: Some(151850),
            tie_word_embeddings: false,
        }
    }
}

/// `rope_scaling` (4.x) / `rope_parameters` (5.x).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

impl TextConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// RoPE base: `rope_parameters.rope_theta` (5.x), else `rope_theta` (4.x), else Emu3's 1e6.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(1_000_000.0)
    }

    /// The RoPE variant; only `default` (plain RoPE, what Emu3 uses) is implemented.
    pub fn rope_type(&self) -> &str {
        self.rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .and_then(|p| p.rope_type.as_deref())
            .unwrap_or("default")
    }

    /// Checks what the port supports, with a message that names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.hidden_act != "silu" {
            return Err(format!("text_config.hidden_act {:?} is not supported (only \"silu\")", self.hidden_act));
        }
        if self.rope_type() != "default" {
            return Err(format!(
                "text_config rope type {:?} is not supported (only \"default\")",
                self.rope_type()
            ));
        }
        if self.num_attention_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(format!(
                "text_config.num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("text_config head_dim {} must be even for RoPE", self.head_dim()));
        }
        Ok(())
    }
}

/// `Emu3VQVAEConfig`: the MoVQ-style image tokenizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct VqConfig {
    pub codebook_size: usize,
    pub embed_dim: usize,
    pub latent_channels: usize,
    pub double_latent: bool,
    pub in_channels: usize,
    pub out_channels: usize,
    pub temporal_downsample_factor: usize,
    pub base_channels: usize,
    pub channel_multiplier: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_resolutions: Vec<usize>,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub attention_dropout: f64,
}

impl Default for VqConfig {
    fn default() -> Self {
        Self {
            codebook_size: 32768,
            embed_dim: 4,
            latent_channels: 4,
            double_latent: false,
            in_channels: 3,
            out_channels: 3,
            temporal_downsample_factor: 4,
            base_channels: 256,
            channel_multiplier: vec![1, 2, 2, 4],
            num_res_blocks: 2,
            attn_resolutions: vec![3],
            hidden_size: 1024,
            num_attention_heads: 1,
            attention_dropout: 0.0,
        }
    }
}

impl VqConfig {
    /// Pixels per code along each axis: 2^(levels-1).
    pub fn spatial_factor(&self) -> usize {
        1 << (self.channel_multiplier.len().saturating_sub(1))
    }

    /// Number of temporal down/up-sampling layers: log2(temporal_downsample_factor).
    pub fn temporal_layers(&self) -> usize {
        self.temporal_downsample_factor.trailing_zeros() as usize
    }

    /// The constraints transformers' implementation relies on implicitly (port spec §1.1).
    pub fn validate(&self) -> Result<(), String> {
        let c = self.base_channels;
        if self.channel_multiplier.is_empty() {
            return Err("vq_config.channel_multiplier is empty".into());
        }
        for (i, m) in self.channel_multiplier.iter().enumerate() {
            if !(c * m).is_multiple_of(32) {
                return Err(format!(
                    "vq_config: base_channels*channel_multiplier[{i}] = {} is not divisible by 32 (GroupNorm groups)",
                    c * m
                ));
            }
        }
        let top = c * self.channel_multiplier.last().copied().unwrap_or(1);
        if self.hidden_size != top {
            return Err(format!(
                "vq_config.hidden_size {} must equal base_channels*channel_multiplier[-1] = {top}",
                self.hidden_size
            ));
        }
        for &level in &self.attn_resolutions {
            if level < self.channel_multiplier.len() && c * self.channel_multiplier[level] != self.hidden_size {
                return Err(format!(
                    "vq_config: attention level {level} has {} channels but hidden_size is {}",
                    c * self.channel_multiplier[level],
                    self.hidden_size
                ));
            }
        }
        if self.embed_dim != self.latent_channels {
            return Err(format!(
                "vq_config.embed_dim {} must equal latent_channels {}",
                self.embed_dim, self.latent_channels
            ));
        }
        if self.double_latent {
            return Err("vq_config.double_latent = true is not supported".into());
        }
        if !self.temporal_downsample_factor.is_power_of_two() {
            return Err(format!(
                "vq_config.temporal_downsample_factor {} must be a power of two",
                self.temporal_downsample_factor
            ));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "vq_config.hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

/// Tessera's metadata block inside `config.json` (ignored by transformers).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct TesseraMeta {
    /// Token grids `[height, width]` the model was trained on.
    #[serde(default)]
    pub grids: Vec<[usize; 2]>,
    /// The unconditional prompt used for classifier-free guidance.
    #[serde(default)]
    pub unconditional_prompt: Option<String>,
    #[serde(default)]
    pub t2i_layout: Option<String>,
    #[serde(default)]
    pub edit_layout: Option<String>,
    /// Recommended guidance scale (`guidance_scale` in the file).
    #[serde(default, alias = "guidance_scale")]
    pub cfg: Option<f64>,
    /// Recommended guidance scale for instruction edits (`edit_guidance_scale` in the file),
    /// whose unconditional prompt still holds the source image; absent: `cfg`.
    #[serde(default, alias = "edit_guidance_scale")]
    pub edit_cfg: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub name: Option<String>,
}

impl Emu3Config {
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_config_takes_transformers_defaults() {
        let cfg = Emu3Config::from_json(
            r#"{"model_type":"emu3","text_config":{"model_type":"emu3_text_model","rope_scaling":{"rope_type":"default"}},
                "vq_config":{"model_type":"emu3_vqgan"},"vocabulary_map":{"<image>":151646}}"#,
        )
        .unwrap();
        assert_eq!(cfg.text_config.hidden_size, 4096);
        assert_eq!(cfg.text_config.num_kv_heads(), 8);
        assert_eq!(cfg.text_config.head_dim(), 128);
        assert_eq!(cfg.text_config.rope_theta(), 1e6);
        assert_eq!(cfg.vq_config.codebook_size, 32768);
        assert_eq!(cfg.vq_config.spatial_factor(), 8);
        assert_eq!(cfg.vq_config.temporal_layers(), 2);
        cfg.text_config.validate().unwrap();
        cfg.vq_config.validate().unwrap();
    }

    #[test]
    fn edit_guidance_is_read_and_optional() {
        let meta: TesseraMeta = serde_json::from_str(r#"{"guidance_scale": 3.0, "edit_guidance_scale": 1.5}"#).unwrap();
        assert_eq!((meta.cfg, meta.edit_cfg), (Some(3.0), Some(1.5)));
        let meta: TesseraMeta = serde_json::from_str(r#"{"guidance_scale": 3.0}"#).unwrap();
        assert_eq!((meta.cfg, meta.edit_cfg), (Some(3.0), None));
    }

    #[test]
    fn rope_theta_from_either_spelling() {
        let v4: TextConfig = serde_json::from_str(r#"{"rope_theta": 10000.0}"#).unwrap();
        assert_eq!(v4.rope_theta(), 10000.0);
        let v5: TextConfig =
            serde_json::from_str(r#"{"rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}}"#).unwrap();
        assert_eq!(v5.rope_theta(), 500.0);
    }

    #[test]
    fn vq_constraints_are_named() {
        let mut vq = VqConfig { base_channels: 32, channel_multiplier: vec![1, 2], hidden_size: 1024, ..Default::default() };
        assert!(vq.validate().unwrap_err().contains("hidden_size"));
        vq.hidden_size = 64;
        vq.attn_resolutions = vec![1];
        vq.validate().unwrap();
    }
}
