//! The model's own configuration: Hugging Face `config.json` and
//! `generation_config.json`, with HF's field names, and the values derived
//! from them (head_dim, GQA group size) computed once here.

use crate::loader::LoadError;
use serde::Deserialize;
use std::path::Path;

/// Architectures this crate runs (`architectures[0]` / `model_type` in config.json).
const SUPPORTED_ARCHITECTURES: &[&str] = &["Qwen2ForCausalLM"];

#[derive(Clone, Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

/// The fields of `config.json` a Qwen2 model needs, in HF's names.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Classic layout: top-level `rope_theta`.
    #[serde(default)]
    rope_theta: Option<f64>,
    /// Newer layout: `rope_parameters: {rope_theta, rope_type}`.
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_max_positions() -> usize {
    32768
}

/// A token id field that HF writes either as one id or as a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        let config: ModelConfig = serde_json::from_str(&text).map_err(|e| LoadError::json(path, e))?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), LoadError> {
        let arch = self.architectures.first().cloned().unwrap_or_else(|| self.model_type.clone());
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) && self.model_type != "qwen2" {
            return Err(LoadError::UnsupportedArchitecture {
                path: path.into(),
                architecture: arch,
            });
        }
        if let Some(kind) = self.rope_parameters.as_ref().and_then(|r| r.rope_type.as_deref()) {
            if kind != "default" {
                return Err(LoadError::invalid_config(
                    path,
                    format!("rope_type {kind:?} is not supported (only \"default\")"),
                ));
            }
        }
        let invalid = |msg: String| Err(LoadError::invalid_config(path, msg));
        if self.num_attention_heads == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return invalid("hidden_size, num_attention_heads and num_hidden_layers must be positive".into());
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return invalid(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return invalid(format!("head_dim {} must be even for rotary embeddings", self.head_dim()));
        }
        if self.num_kv_heads() == 0 || self.num_attention_heads % self.num_kv_heads() != 0 {
            return invalid(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// Parameters in the model (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (q, kv) = (self.num_attention_heads * hd, self.num_kv_heads() * hd);
        let attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h;
        let layer = attn + 3 * h * i + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_hidden_layers * layer + h
    }
}

/// `generation_config.json`: EOS ids and the default sampling settings.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` from a model folder; absent means defaults.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(GenerationConfig::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| LoadError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| LoadError::json(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> ModelConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn both_rope_layouts_give_rope_theta() {
        let base = r#""architectures":["Qwen2ForCausalLM"],"vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1"#;
        let classic = parse(&format!("{{{base},\"rope_theta\":1000000.0}}"));
        let newer = parse(&format!(
            "{{{base},\"rope_parameters\":{{\"rope_theta\":5000.0,\"rope_type\":\"default\"}}}}"
        ));
        assert_eq!(classic.rope_theta(), 1e6);
        assert_eq!(newer.rope_theta(), 5000.0);
        assert_eq!(newer.head_dim(), 4);
    }

    #[test]
    fn parameter_counts_match_the_published_qwen25_sizes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models");
        for (file, billions) in [
            ("qwen2.5-0.5b.json", 0.494),
            ("qwen2.5-7b.json", 7.616),
            ("qwen2.5-72b.json", 72.706),
        ] {
            let c = ModelConfig::from_file(&dir.join(file)).unwrap();
            let got = c.num_parameters() as f64 / 1e9;
            assert!((got - billions).abs() < 0.001, "{file}: {got}");
        }
    }
}
