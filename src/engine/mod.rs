//! The serving engine: continuous batching over a paged KV cache, on one
//! thread that owns the queue, the sequences and the blocks.

pub mod block_manager;
mod core;
mod handle;
pub mod request;
pub mod scheduler;
pub mod stats;
pub mod stop;

pub use self::core::{Engine, EngineConfig};
pub use self::handle::EngineHandle;
