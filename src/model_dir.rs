//! Opens what `--model` names for use: the config, the weights on a backend,
//! the tokenizer and chat template when the folder has them, and the
//! generation defaults.

use crate::backend::{Backend, DType};
use crate::config::{GenerationConfig, ModelConfig};
use crate::loader::{DummyWeights, LoadError, LoadFormat, ModelPaths, SafetensorsCheckpoint, WeightSource};
use crate::model::{Qwen2ForCausalLM, Shard};
use crate::tokenizer::{Tokenizer, TokenizerError};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// A Hugging Face model folder, or a `config.json` with `LoadFormat::Dummy`.
    pub model: PathBuf,
    pub load_format: LoadFormat,
    /// Seeds dummy weights.
    pub seed: u64,
    /// Dtype of dummy weights.
    pub dummy_dtype: DType,
}

pub struct LoadedModel<B: Backend> {
    pub model: Qwen2ForCausalLM<B>,
    /// `None` when the folder has no `tokenizer.json` (token ids only).
    pub tokenizer: Option<Tokenizer>,
    pub generation: GenerationConfig,
    /// Ids that end generation: generation_config.json's, else config.json's.
    pub eos_token_ids: Vec<u32>,
    /// The folder's name, as served.
    pub name: String,
}

/// The weights `options` name.
fn weight_source(options: &ModelOptions, paths: &ModelPaths) -> Result<Box<dyn WeightSource>, LoadError> {
    Ok(match options.load_format {
        LoadFormat::Safetensors => Box::new(SafetensorsCheckpoint::open(&paths.dir)?),
        LoadFormat::Dummy => Box::new(DummyWeights {
            seed: options.seed,
            dtype: options.dummy_dtype,
        }),
    })
}

/// One rank's part of the model (checkpoints are memory-mapped, so each
/// rank reads only the slices it keeps).
pub fn open_shard<B: Backend>(backend: B, options: &ModelOptions, shard: Shard) -> Result<Qwen2ForCausalLM<B>, LoadError> {
    let paths = ModelPaths::resolve(&options.model)?;
    let config = ModelConfig::from_file(&paths.config)?;
    let source = weight_source(options, &paths)?;
    Qwen2ForCausalLM::load_shard(backend, config, source.as_ref(), shard)
}

/// The dtype of the checkpoint's weight matrices (its embedding's), which
/// sets the bytes they take on a GPU.
pub fn weight_dtype(options: &ModelOptions) -> Result<DType, LoadError> {
    let paths = ModelPaths::resolve(&options.model)?;
    weight_source(options, &paths)?.dtype("model.embed_tokens.weight")
}

/// Everything `--model` names except the weights: for a model whose ranks
/// load their own shards.
pub struct ModelInfo {
    pub config: ModelConfig,
    /// `None` when the folder has no `tokenizer.json` (token ids only).
    pub tokenizer: Option<Tokenizer>,
    pub generation: GenerationConfig,
    /// Ids that end generation: generation_config.json's, else config.json's.
    pub eos_token_ids: Vec<u32>,
    /// The folder's name, as served.
    pub name: String,
}

pub fn describe(options: &ModelOptions) -> Result<ModelInfo, OpenError> {
    let paths = ModelPaths::resolve(&options.model)?;
    let config = ModelConfig::from_file(&paths.config)?;
    let generation = GenerationConfig::from_dir(&paths.dir)?;
    let eos_token_ids = generation
        .eos_token_id
        .as_ref()
        .or(config.eos_token_id.as_ref())
        .map(|e| e.to_vec())
        .unwrap_or_default();
    let tokenizer = match paths.dir.join("tokenizer.json").exists() {
        true => Some(Tokenizer::from_dir(&paths.dir)?),
        false => None,
    };
    let name = match options.load_format {
        LoadFormat::Dummy => paths.config.file_stem(),
        LoadFormat::Safetensors => paths.dir.file_name(),
    }
    .map(|n| n.to_string_lossy().into_owned())
    .unwrap_or_else(|| "model".into());
    Ok(ModelInfo {
        config,
        tokenizer,
        generation,
        eos_token_ids,
        name,
    })
}

pub fn open<B: Backend>(backend: B, options: &ModelOptions) -> Result<LoadedModel<B>, OpenError> {
    let ModelInfo {
        config,
        tokenizer,
        generation,
        eos_token_ids,
        name,
    } = describe(options)?;
    let paths = ModelPaths::resolve(&options.model)?;
    let source = weight_source(options, &paths)?;
    let model = Qwen2ForCausalLM::load(backend, config, source.as_ref())?;
    Ok(LoadedModel {
        model,
        tokenizer,
        generation,
        eos_token_ids,
        name,
    })
}
