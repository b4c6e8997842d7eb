//! The tensor operations a Qwen2 forward needs, as a trait each device implements.
//!
//! The model is written once against [`Backend`]; the CPU backend is the
//! reference and the default, and a CUDA backend implements the same ops with
//! kernels. Activations are row-major `[rows, cols]` matrices (one row per
//! token); weights stay in the device's preferred layout and, where that saves
//! memory bandwidth, in their checkpoint dtype.

pub mod cpu;
pub mod cuda;

use crate::sampling::RowSampling;
use std::fmt;
use std::ops::Range;

/// Element types a checkpoint may store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

// Checkpoints are little-endian, and the backends upload or copy their bytes
// as they are: the values only on a little-endian host.
const _: () = assert!(cfg!(target_endian = "little"), "shardline assumes a little-endian host");

/// A tensor in host memory, as read from a checkpoint: raw little-endian bytes.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl HostTensor {
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        HostTensor {
            dtype: DType::F32,
            shape,
            bytes,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// `[rows, cols]` of a matrix; any other tensor as one row (a vector).
    pub fn matrix_dims(&self) -> (usize, usize) {
        match self.shape[..] {
            [rows, cols] => (rows, cols),
            _ => (1, self.numel()),
        }
    }

    /// The values widened to f32 (exact for every supported dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }

    /// Stacks tensors with equal trailing dimensions along dimension 0
    /// (fusing q/k/v or gate/up into one matrix). Mixed dtypes widen to f32.
    pub fn concat_rows(parts: &[HostTensor]) -> HostTensor {
        let cols: Vec<usize> = parts[0].shape[1..].to_vec();
        assert!(parts.iter().all(|p| p.shape[1..] == cols[..]), "concat_rows: trailing dims differ");
        let rows = parts.iter().map(|p| p.shape[0]).sum();
        let shape = [vec![rows], cols].concat();
        if parts.iter().all(|p| p.dtype == parts[0].dtype) {
            let bytes = parts.iter().flat_map(|p| p.bytes.iter().copied()).collect();
            return HostTensor {
                dtype: parts[0].dtype,
                shape,
                bytes,
            };
        }
        let values: Vec<f32> = parts.iter().flat_map(|p| p.to_f32()).collect();
        HostTensor::from_f32(shape, &values)
    }
}

/// Errors a device reports while running an op.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("out of device memory allocating {bytes} bytes for {what}")]
    OutOfMemory { what: String, bytes: usize },
    #[error("{0}")]
    Device(String),
    /// A collective or point-to-point transfer failed (a peer rank died,
    /// or ranks disagreed on a buffer's size).
    #[error("communication: {0}")]
    Comm(String),
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// The shape of one layer's paged KV cache: `num_blocks` blocks of
/// `block_size` token slots, each slot holding `num_kv_heads × head_dim` keys
/// and as many values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheShape {
    /// Bytes per token slot for keys and values together, at `dtype_bytes` each.
    pub fn bytes_per_slot(&self, dtype_bytes: usize) -> usize {
        2 * self.num_kv_heads * self.head_dim * dtype_bytes
    }
}

/// Attention head layout of one layer on one device.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSpec {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Where each sequence of a batch reads and writes the paged KV cache.
///
/// The batch's new tokens are laid out sequence after sequence; sequence `s`
/// owns `query_lens[s]` consecutive rows, which are the last tokens of its
/// `context_lens[s]`-token context (cached prefix plus new tokens).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PagedAttentionMeta {
    pub block_size: usize,
    /// `[num_tokens]`: the cache slot (`block * block_size + offset`) each new token writes.
    pub slot_mapping: Vec<u32>,
    /// `[num_seqs]`: new tokens per sequence in this step.
    pub query_lens: Vec<usize>,
    /// `[num_seqs]`: tokens in each sequence's context after this step.
    pub context_lens: Vec<usize>,
    /// `[num_seqs][blocks]`: physical block ids holding each sequence's context, in order.
    pub block_tables: Vec<Vec<u32>>,
}

impl PagedAttentionMeta {
    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }

    /// The widest block table.
    pub fn max_blocks(&self) -> usize {
        self.block_tables.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// A token id of a step's inputs that is not known on the host yet: the
/// token the device's previous [`Backend::sample`] picked for row `id &
/// !PREVIOUS_SAMPLE` (of that step's logit rows), still on the device.
/// The engine submits a decode step this way before it has collected the
/// step whose token it extends, so the device never waits for the host.
pub const PREVIOUS_SAMPLE: u32 = 1 << 31;

/// The row of the previous sample that a [`PREVIOUS_SAMPLE`] id names;
/// `None` for a token known on the host.
pub fn previous_row(id: u32) -> Option<u32> {
    (id & PREVIOUS_SAMPLE != 0).then_some(id & !PREVIOUS_SAMPLE)
}

/// Everything one forward reads from the host, handed to the device in one
/// [`Backend::prepare_step`] so no op uploads on its own (and a recorded
/// graph can replay the ops on a step refilled in place).
#[derive(Clone, Copy, Debug)]
pub struct StepInputs<'a> {
    /// `[n]` the tokens to embed, as rows of this rank's embedding table,
    /// or [`PREVIOUS_SAMPLE`] rows.
    pub token_ids: &'a [u32],
    /// `[n]` each token's position in its sequence.
    pub positions: &'a [u32],
    pub attn: &'a PagedAttentionMeta,
    /// `[rows]` rows of the batch whose logits are computed.
    pub logit_rows: &'a [u32],
    /// `[rows]` how the backend picks each row's token, when it does (else empty).
    pub sampling: &'a [RowSampling],
}

impl StepInputs<'_> {
    /// A sampling row's [`RowSampling::coming`] that no token of the step
    /// takes: a device learns a coming token only where the step's
    /// embedding resolves it.
    pub fn unresolved_coming(&self) -> Option<u32> {
        if self.sampling.iter().all(|r| r.coming.is_none()) {
            return None;
        }
        let mut taken = Vec::new();
        for at in self.token_ids.iter().filter_map(|&id| previous_row(id)).map(|at| at as usize) {
            if at >= taken.len() {
                taken.resize(at + 1, false);
            }
            taken[at] = true;
        }
        let taken = |at: u32| taken.get(at as usize).copied().unwrap_or(false);
        self.sampling.iter().filter_map(|r| r.coming).find(|&at| !taken(at))
    }
}

/// The largest step a step buffer of fixed size holds (see
/// [`Backend::static_step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepCapacity {
    pub tokens: usize,
    pub seqs: usize,
    /// Block-table entries per sequence.
    pub max_blocks: usize,
    pub rows: usize,
    /// Logit adjustments over all rows.
    pub adjustments: usize,
}

/// The RMSNorm an op applies to its input first: its weight and epsilon.
pub struct RmsNorm<'a, W> {
    pub weight: &'a W,
    pub eps: f32,
}

impl<W> Clone for RmsNorm<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W> Copy for RmsNorm<'_, W> {}

/// The ops of a Qwen2 forward on one device.
///
/// `Tensor` is an activation matrix on the device; `Weight` a parameter
/// (matrix `[out, in]` or vector) uploaded once; `KvCache` one layer's
/// paged key/value store.
pub trait Backend {
    type Tensor;
    type Weight: Send + Sync;
    type KvCache;
    /// One forward's [`StepInputs`], prepared once (a GPU uploads them) for
    /// every op that reads them, and where the sampled tokens land.
    type Step<'a>: Send;
    /// Ops recorded once and replayed as one launch (a CUDA graph).
    type Graph: Send;
    /// A step's sampled ids on their way to the host.
    type Fetch: Send;

    fn name(&self) -> &'static str;

    /// Uploads a parameter. Matrices are `[out_features, in_features]`.
    fn load_weight(&self, host: HostTensor) -> Result<Self::Weight>;

    /// Device bytes a weight occupies.
    fn weight_bytes(&self, w: &Self::Weight) -> usize;

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<Self::KvCache>;

    /// `table [rows, hidden]` at the step's token ids → `[n, hidden]`. The
    /// ids are rows of the table, but for a [`PREVIOUS_SAMPLE`]'s token
    /// `t`, which is row `t - vocab.start` where `vocab` (the ids the rows
    /// stand for) holds it, else the table's last row (a split table's
    /// zero row).
    fn embedding(&self, table: &Self::Weight, step: &Self::Step<'_>, vocab: Range<u32>) -> Result<Self::Tensor>;

    /// `x [n, in]`, `w [out, in]`, `bias [out]` → `x · wᵀ + bias`, `[n, out]`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight, bias: Option<&Self::Weight>) -> Result<Self::Tensor>;

    /// RMSNorm of each row of `x`, scaled by `weight`.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Weight, eps: f32) -> Result<Self::Tensor>;

    /// `residual += x · wᵀ`: a sublayer's output projection added into the
    /// residual stream, in one pass where the backend can.
    fn add_linear(&self, residual: &mut Self::Tensor, x: &Self::Tensor, w: &Self::Weight) -> Result<()> {
        let out = self.linear(x, w, None)?;
        self.add_assign(residual, &out)
    }

    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;

    /// The step of a batch's inputs.
    fn prepare_step<'a>(&self, inputs: StepInputs<'a>) -> Result<Self::Step<'a>>;

    /// Rotates the q and k heads of a fused `qkv [n, (heads + 2·kv_heads) · head_dim]`
    /// in place (neox layout) by each token's position, and writes its k and
    /// v heads into the cache at the step's slot mapping. `cos_sin [max_pos,
    /// head_dim]` holds cos in its first half and sin in its second, per position.
    fn rope_write_kv(
        &self,
        qkv: &mut Self::Tensor,
        cache: &mut Self::KvCache,
        step: &Self::Step<'_>,
        cos_sin: &Self::Weight,
        spec: &AttentionSpec,
    ) -> Result<()>;

    /// The attention's input: `qkv = linear(RMSNorm(x), w, bias)`, then
    /// [`Backend::rope_write_kv`] on it; one op, so that a backend may do
    /// it all in one pass (the CUDA mat-vec does, for a few tokens).
    #[allow(clippy::too_many_arguments)]
    fn project_qkv(
        &self,
        x: &Self::Tensor,
        norm: RmsNorm<'_, Self::Weight>,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        cache: &mut Self::KvCache,
        step: &Self::Step<'_>,
        cos_sin: &Self::Weight,
        spec: &AttentionSpec,
    ) -> Result<Self::Tensor> {
        let normed = self.rms_norm(x, norm.weight, norm.eps)?;
        let mut qkv = self.linear(&normed, w, bias)?;
        self.rope_write_kv(&mut qkv, cache, step, cos_sin, spec)?;
        Ok(qkv)
    }

    /// Causal attention of the q heads of `qkv` over each sequence's cached
    /// context (prefill, chunked prefill and decode alike) → `[n, heads · head_dim]`.
    fn paged_attention(
        &self,
        qkv: &Self::Tensor,
        cache: &Self::KvCache,
        step: &Self::Step<'_>,
        spec: &AttentionSpec,
    ) -> Result<Self::Tensor>;

    /// The MLP's first half: `silu(x̂ · gateᵀ) · (x̂ · upᵀ)`, `[n, i]`, for
    /// `x̂ = RMSNorm(x)` and a fused `gate_up [2·i, hidden]` (the gate rows,
    /// then the up rows).
    fn swiglu(&self, x: &Self::Tensor, norm: RmsNorm<'_, Self::Weight>, gate_up: &Self::Weight) -> Result<Self::Tensor>;

    /// The model's output rows: `RMSNorm(x[r])` for each of the step's
    /// logit rows `r`, in order.
    fn final_norm(&self, x: &Self::Tensor, step: &Self::Step<'_>, weight: &Self::Weight, eps: f32) -> Result<Self::Tensor>;

    /// Logits gathered from `ranks` ranks of a split vocabulary, `all
    /// [ranks · rows, per + 1]` (each rank's `[rows, per + 1]` slice, its
    /// last column padding), as `[rows, vocab]`: the slices side by side,
    /// the padding and the columns past `vocab` dropped.
    fn lay_out_vocab(&self, all: &Self::Tensor, ranks: usize, per: usize, vocab: usize) -> Result<Self::Tensor>;

    /// Picks one token per row of `logits [rows, vocab]` as the step's
    /// sampling rows say (the rules of [`crate::sampling::choose`]), into
    /// the step, leaving the adjusted scores in `logits`. The tokens also
    /// stay on the device for the next step's [`PREVIOUS_SAMPLE`] ids.
    fn sample(&self, logits: &mut Self::Tensor, step: &mut Self::Step<'_>) -> Result<()>;

    /// Starts copying the tokens [`Backend::sample`] picked to the host,
    /// behind the step's work (only the ids leave the device).
    fn fetch_sampled(&self, step: &Self::Step<'_>) -> Result<Self::Fetch>;

    /// The first `n` ids of a fetch, once the copy is done (waiting for it).
    fn fetched(&self, fetch: Self::Fetch, n: usize) -> Result<Vec<u32>>;

    /// A step buffer of fixed size and place, for a graph to read from:
    /// [`Backend::update_step`] refills it. `None` where the backend
    /// records no graphs.
    fn static_step(&self, capacity: StepCapacity) -> Result<Option<Self::Step<'static>>>;

    /// Refills a [`Backend::static_step`] with `inputs`, which have exactly
    /// its tokens, sequences and rows, and at most its blocks and adjustments.
    fn update_step(&self, step: &mut Self::Step<'static>, inputs: StepInputs<'_>) -> Result<()>;

    /// Records the ops `record` queues, running none of them; they may read
    /// only buffers that outlive the graph (a static step, weights, caches).
    fn capture(&self, record: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph>;

    /// Runs a recorded graph on what its buffers hold now.
    fn replay(&self, graph: &Self::Graph) -> Result<()>;

    /// Copies a tensor to host memory as row-major f32, into `out` (replacing
    /// its contents; a buffer reused across steps is never reallocated).
    fn to_host(&self, x: &Self::Tensor, out: &mut Vec<f32>) -> Result<()>;

    /// A `[rows, cols]` tensor of zeros (a buffer to receive into).
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
}

/// Tensors the in-process communicator can exchange: copied out to host
/// f32 and back (free for host tensors; a device copy for a GPU's).
pub trait HostStaging {
    /// Number of f32 values.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Replaces `out`'s contents with the values.
    fn copy_to_host(&self, out: &mut Vec<f32>) -> Result<()>;
    /// Overwrites the values with `values` (of length [`HostStaging::len`]).
    fn copy_from_host(&mut self, values: &[f32]) -> Result<()>;
}

impl HostStaging for [f32] {
    fn len(&self) -> usize {
        <[f32]>::len(self)
    }

    fn copy_to_host(&self, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.extend_from_slice(self);
        Ok(())
    }

    fn copy_from_host(&mut self, values: &[f32]) -> Result<()> {
        self.copy_from_slice(values);
        Ok(())
    }
}
