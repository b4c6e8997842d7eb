//! The serving engine: continuous batching over a paged KV cache, on one
//! thread that owns the queue, the sequences and the blocks.

pub mod block_manager;
mod core;
pub mod executor;
mod handle;
pub mod request;
pub mod scheduler;
pub mod stats;
pub mod stop;
pub mod workers;

pub use self::core::{Engine, EngineConfig};
pub use self::executor::{Executor, LocalExecutor};
pub use self::handle::EngineHandle;
pub use self::workers::{WorkerOptions, Workers};
