//! The CPU backend against Hugging Face: logits at every prompt position
//! within 1e-4 relative error, and greedy continuations identical, for the
//! random GQA and MQA models and the trained chat model. Also the same
//! numbers when the prompt is prefilled in chunks, and when several prompts
//! share one batch with their KV blocks interleaved in the paged cache.

mod common;

use common::{assert_rows_close, generator, prompt_keys, Reference};
use shardline::backend::PagedAttentionMeta;
use shardline::model::{ForwardBatch, StepOutput};
use shardline::sampling::argmax;

const TOLERANCE: f64 = 1e-4;

fn check_every_position_and_greedy(name: &str) {
    let reference = Reference::open(name);
    let mut gen = generator(name, 256);
    let keys = prompt_keys(&reference);
    assert!(!keys.is_empty());
    for p in keys {
        let ids = reference.ids(&format!("{p}.input_ids"));
        let (rows, vocab, want) = reference.matrix(&format!("{p}.logits"));
        gen.reset();
        let logits = gen.extend(&ids, true).unwrap();
        // The reference holds every position, or (tiny-chat) the last `rows`.
        let ours = &logits[(ids.len() - rows) * vocab..];
        assert_rows_close(ours, &want, vocab, TOLERANCE, &format!("{name} {p}"));

        let greedy_key = format!("{p}.greedy_ids");
        if reference.has(&greedy_key) {
            let want_ids = reference.ids(&greedy_key);
            let mut next = argmax(&logits[logits.len() - vocab..]);
            let mut got = vec![next];
            while got.len() < want_ids.len() {
                next = argmax(&gen.decode_one_token(next).unwrap());
                got.push(next);
            }
            assert_eq!(got, want_ids, "{name} {p}: greedy continuation");
        }
    }
}

#[test]
fn tiny_gqa_matches_hf_logits_and_greedy_ids() {
    check_every_position_and_greedy("tiny-gqa");
}

#[test]
fn tiny_mqa128_matches_hf_logits_and_greedy_ids() {
    check_every_position_and_greedy("tiny-mqa128");
}

#[test]
fn tiny_chat_matches_hf_logits_over_the_full_vocabulary() {
    check_every_position_and_greedy("tiny-chat");
}

#[test]
fn chunked_prefill_gives_the_same_logits() {
    let reference = Reference::open("tiny-gqa");
    let ids = reference.ids("prompt3.input_ids"); // 130 tokens
    let (_, vocab, want) = reference.matrix("prompt3.logits");
    let mut gen = generator("tiny-gqa", 256);
    let mut logits = Vec::new();
    for chunk in [&ids[..16], &ids[16..21], &ids[21..100], &ids[100..]] {
        logits.extend(gen.extend(chunk, true).unwrap());
    }
    assert_rows_close(&logits, &want, vocab, TOLERANCE, "chunked prefill");
}

#[test]
fn a_batch_of_prompts_in_interleaved_blocks_gives_each_its_reference_logits() {
    let name = "tiny-mqa128";
    let reference = Reference::open(name);
    let loaded = common::load(name);
    let prompts: Vec<Vec<u32>> = prompt_keys(&reference)
        .iter()
        .map(|p| reference.ids(&format!("{p}.input_ids")))
        .collect();
    let block_size = 16;
    // Hand out blocks round-robin so every sequence's blocks are scattered.
    let mut tables: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut next_block = 0u32;
    for round in 0.. {
        let mut any = false;
        for (s, p) in prompts.iter().enumerate() {
            if round * block_size < p.len() {
                tables[s].push(next_block);
                next_block += 1;
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    let mut batch = ForwardBatch {
        attn: PagedAttentionMeta {
            block_size,
            block_tables: tables.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    for (s, p) in prompts.iter().enumerate() {
        for (pos, &id) in p.iter().enumerate() {
            batch.logit_rows.push(batch.token_ids.len() as u32);
            batch.token_ids.push(id);
            batch.positions.push(pos as u32);
            batch
                .attn
                .slot_mapping
                .push(tables[s][pos / block_size] * block_size as u32 + (pos % block_size) as u32);
        }
        batch.attn.query_lens.push(p.len());
        batch.attn.context_lens.push(p.len());
    }
    let model = &loaded.model;
    let mut caches = model
        .alloc_kv_caches(model.kv_cache_shape(next_block as usize, block_size))
        .unwrap();
    let mut out = StepOutput::default();
    model.forward(&batch, &mut caches, &mut out).unwrap();
    let logits = out.logits;
    let mut offset = 0;
    for (i, p) in prompts.iter().enumerate() {
        let (_, vocab, want) = reference.matrix(&format!("prompt{i}.logits"));
        let ours = &logits[offset..offset + p.len() * vocab];
        assert_rows_close(ours, &want, vocab, TOLERANCE, &format!("batched prompt{i}"));
        offset += p.len() * vocab;
    }
}
