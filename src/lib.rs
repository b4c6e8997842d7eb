//! shardline: a multi-GPU LLM inference server for Qwen2-family models.
//!
//! Layers, each knowing only the ones below it (see ARCHITECTURE.md):
//! `api` (HTTP) → `engine` (continuous batching) and `generation` (one
//! sequence) → `executor` (the model on one device, or worker threads per
//! rank) → `model` (Qwen2 over a backend, whole or one rank's shard) →
//! `parallel` (layouts, communicators, `plan`) → `backend` (tensor ops:
//! `cpu`, later `cuda`). Beside them: `loader` (safetensors and dummy
//! weights), `config` (HF config files), `tokenizer` (tokenizer.json, chat
//! templates, incremental detokenization) and `sampling`.

pub mod api;
pub mod backend;
pub mod config;
pub mod engine;
pub mod executor;
pub mod generation;
pub mod loader;
pub mod model;
pub mod model_dir;
pub mod parallel;
pub mod rng;
pub mod sampling;
pub mod tokenizer;
