//! Splitting a model over several devices: which layout is valid for a
//! model (`layout`), how ranks talk (`comm`), and what fits where (`plan`).
//!
//! Rank `r` of a `tp × pp` world is tensor-parallel rank `r % tp` of
//! pipeline stage `r / tp`.

pub mod comm;
pub mod layout;
pub mod plan;

pub use comm::{in_process_group, Communicator, InProcessComm};
pub use layout::{Layout, LayoutError};
