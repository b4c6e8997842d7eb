//! Paged attention on the CPU: KV-cache writes through a slot mapping, and
//! causal attention that reads each sequence's context through its block table.
//!
//! One code path serves prefill, chunked prefill and decode: a query at
//! context position `p` attends to cached positions `0..=p`, wherever the
//! blocks holding them live. Work is split across cores by (token, head).

use super::simd::dot;
use super::{CpuKvCache, CpuTensor};
use crate::backend::{AttentionSpec, PagedAttentionMeta};
use rayon::prelude::*;

pub fn write_kv(qkv: &CpuTensor, cache: &mut CpuKvCache, meta: &PagedAttentionMeta, spec: &AttentionSpec) {
    let width = spec.num_kv_heads * spec.head_dim;
    let k_start = spec.num_heads * spec.head_dim;
    for (t, &slot) in meta.slot_mapping.iter().enumerate() {
        let row = qkv.row(t);
        let dst = slot as usize * width..(slot as usize + 1) * width;
        cache.k[dst.clone()].copy_from_slice(&row[k_start..k_start + width]);
        cache.v[dst].copy_from_slice(&row[k_start + width..k_start + 2 * width]);
    }
}

pub fn paged_attention(qkv: &CpuTensor, cache: &CpuKvCache, meta: &PagedAttentionMeta, spec: &AttentionSpec) -> CpuTensor {
    let (hd, heads) = (spec.head_dim, spec.num_heads);
    let group = heads / spec.num_kv_heads;
    let kv_width = spec.num_kv_heads * hd;
    // For each new token: its sequence and its position in that sequence's context.
    let mut token_seq = Vec::with_capacity(meta.num_tokens());
    for (s, (&q_len, &ctx)) in meta.query_lens.iter().zip(&meta.context_lens).enumerate() {
        token_seq.extend((ctx - q_len..ctx).map(|pos| (s, pos)));
    }
    let mut out = vec![0.0f32; meta.num_tokens() * heads * hd];
    out.par_chunks_mut(hd).enumerate().for_each(|(i, o)| {
        let (t, h) = (i / heads, i % heads);
        let (s, pos) = token_seq[t];
        let q = &qkv.row(t)[h * hd..(h + 1) * hd];
        let kv_off = (h / group) * hd;
        let slots = || context_slots(&meta.block_tables[s], meta.block_size, pos + 1);
        let mut scores: Vec<f32> = slots()
            .map(|slot| {
                let at = slot * kv_width + kv_off;
                dot(q, &cache.k[at..at + hd]) * spec.scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        for (slot, p) in slots().zip(&scores) {
            let at = slot * kv_width + kv_off;
            let w = p / total;
            o.iter_mut().zip(&cache.v[at..at + hd]).for_each(|(o, v)| *o += w * v);
        }
    });
    CpuTensor::new(out, meta.num_tokens(), heads * hd)
}

/// The cache slots of a sequence's first `len` positions, in order.
fn context_slots(block_table: &[u32], block_size: usize, len: usize) -> impl Iterator<Item = usize> + '_ {
    block_table
        .iter()
        .flat_map(move |&b| (0..block_size).map(move |o| b as usize * block_size + o))
        .take(len)
}
