//! Seeded sampling with every cut, penalty and bias, and logprobs, done two
//! ways: by the host sampler from a step's returned logits, and by the model
//! where its logits are (a GPU's kernel, a split's last stage). Given the
//! same logits, the two must pick the same tokens.

use shardline::generation::{blocks_for, GenerateRequest, Generator};
use shardline::sampling::{SampledToken, Sampler, SamplingParams};

/// A request over `prompt` that exercises every sampling rule at once.
pub fn request(prompt: &[u32], max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: prompt.to_vec(),
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.9,
            min_p: 0.02,
            repetition_penalty: 1.2,
            presence_penalty: 0.3,
            frequency_penalty: 0.2,
            logit_bias: vec![(5, 1.0), (9, -2.0)],
            seed: Some(7),
            logprobs: Some(3),
        },
        eos_token_ids: Vec::new(),
        ignore_eos: true,
    }
}

/// KV blocks for `request`.
pub fn blocks(request: &GenerateRequest) -> usize {
    blocks_for(request.prompt_ids.len() + request.max_tokens)
}

/// `request` sampled on the host from the logits each step returns.
pub fn by_host(mut generator: Generator, request: &GenerateRequest) -> Vec<SampledToken> {
    let prompt = &request.prompt_ids;
    let mut sampler = Sampler::new(request.sampling.clone());
    let mut tokens = prompt.clone();
    let mut logits = generator.extend(prompt, false).unwrap();
    let mut sampled = Vec::new();
    while sampled.len() < request.max_tokens {
        let token = sampler.sample(&logits, &tokens, prompt.len());
        tokens.push(token.token_id);
        logits = generator.decode_one_token(token.token_id).unwrap();
        sampled.push(token);
    }
    sampled
}

/// `request` sampled by the model.
pub fn by_model(mut generator: Generator, request: &GenerateRequest) -> Vec<SampledToken> {
    generator.generate(request, |_| {}).unwrap().tokens
}

pub fn assert_same(got: &[SampledToken], want: &[SampledToken], what: &str) {
    let ids = |t: &[SampledToken]| t.iter().map(|t| t.token_id).collect::<Vec<_>>();
    assert_eq!(ids(got), ids(want), "{what}: sampled ids");
    for (g, w) in got.iter().zip(want) {
        let (g, w) = (g.logprobs.as_ref().unwrap(), w.logprobs.as_ref().unwrap());
        assert!(
            (g.logprob - w.logprob).abs() < 1e-3,
            "{what}: logprob {} vs {}",
            g.logprob,
            w.logprob
        );
        assert_eq!(g.top.len(), w.top.len(), "{what}: top logprobs");
    }
}
