//! tiny-chat's `greedy_chat` cases of the Hugging Face reference, answered
//! by a generator on any backend.

use serde_json::{json, Value};
use shardline::backend::Backend;
use shardline::generation::{FinishReason, GenerateRequest, Generator};
use shardline::model_dir::LoadedModel;
use shardline::sampling::SamplingParams;
use shardline::tokenizer::DecodeStream;

/// Asserts `loaded` (tiny-chat) answers all 30 cases word for word: the
/// chat template renders the reference prompt ids, greedy decoding gives
/// the reference ids (final EOS included), and both the full decode and the
/// incremental text stream give the reference text.
pub fn answers_every_greedy_chat_case<B>(loaded: LoadedModel<B>)
where
    B: Backend + Send + 'static,
    B::Weight: Send,
    B::KvCache: Send,
{
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(super::repo().join("tests/fixtures/tiny-chat/reference.json")).unwrap()).unwrap();
    let cases = reference["greedy_chat"].as_array().unwrap();
    assert_eq!(cases.len(), 30);
    let tokenizer = loaded.tokenizer.unwrap();
    let mut gen = Generator::new(loaded.model, 256).unwrap();
    for case in cases {
        let question = case["question"].as_str().unwrap();
        let mut messages = Vec::new();
        if let Some(system) = case["system"].as_str() {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": question}));
        let prompt = tokenizer.apply_chat_template(&json!(messages), None, true).unwrap();
        let prompt_ids = tokenizer.encode(&prompt).unwrap();
        let want_prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(prompt_ids, want_prompt, "{question}: prompt ids");

        let request = GenerateRequest {
            prompt_ids,
            max_tokens: 96,
            sampling: SamplingParams::greedy(),
            eos_token_ids: loaded.eos_token_ids.clone(),
            ignore_eos: false,
        };
        let mut stream = DecodeStream::new(&tokenizer, &request.prompt_ids);
        let mut streamed = String::new();
        let out = gen
            .generate(&request, |t| streamed += &stream.step(&tokenizer, t.token_id))
            .unwrap();
        streamed += &stream.finish(&tokenizer);

        let want_ids: Vec<u32> = serde_json::from_value(case["completion_ids"].clone()).unwrap();
        let want_text = case["completion_text"].as_str().unwrap();
        assert_eq!(out.completion_ids(), want_ids, "{question}: completion ids");
        assert_eq!(tokenizer.decode(&out.completion_ids(), true), want_text, "{question}: text");
        assert_eq!(streamed, want_text, "{question}: streamed text");
        let want_finish = if case["finish_reason"] == "stop" {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        assert_eq!(out.finish_reason, want_finish, "{question}");
    }
}
