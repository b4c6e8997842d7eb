//! tiny-chat answers every `greedy_chat` case of the Hugging Face reference
//! word for word on the CPU backend (tests/common/chat.rs), and the
//! generator submits each decode step before the last one's token is back,
//! penalties or not.

mod common;

use common::engine::{cases, ids, Recording};
use common::sampled;
use shardline::executor::LocalExecutor;
use shardline::generation::{blocks_for, FinishReason, GenerateRequest, Generator, BLOCK_SIZE};
use shardline::sampling::SamplingParams;

#[test]
fn tiny_chat_answers_all_greedy_chat_cases_word_for_word() {
    common::chat::answers_every_greedy_chat_case(common::load("tiny-chat"));
}

#[test]
fn the_generator_plans_each_step_ahead_and_a_penalty_counts_the_token_it_has_not_seen() {
    let case = &cases()[0];
    let want = ids(&case["completion_ids"]);
    // A negative presence penalty favours each token generated so far,
    // the one just sampled (still on the device) included.
    let penalized = SamplingParams {
        repetition_penalty: 1.3,
        presence_penalty: -50.0,
        ..SamplingParams::greedy()
    };
    // (sampling, max_tokens): steps handed over, and how many of them took
    // the token before from the device.
    let runs = [
        (SamplingParams::greedy(), 96, (want.len() + 1, want.len())),
        (SamplingParams::greedy(), 5, (5, 4)),
        (penalized, 6, (6, 5)),
    ];
    for (sampling, max_tokens, expected) in runs {
        let request = GenerateRequest {
            prompt_ids: ids(&case["prompt_ids"]),
            max_tokens,
            sampling: sampling.clone(),
            eos_token_ids: vec![151645, 151643],
            ignore_eos: false,
        };
        let blocks = blocks_for(request.prompt_ids.len() + max_tokens);
        let local = LocalExecutor::new(common::load("tiny-chat").model, blocks, BLOCK_SIZE).unwrap();
        let executor = Recording::new(Box::new(local));
        let handed = executor.handed.clone();
        let mut generator = Generator::with_executor(Box::new(executor), blocks);
        let out = generator.generate(&request, |_| {}).unwrap();
        if sampling.presence_penalty == 0.0 {
            assert_eq!(out.completion_ids(), want[..want.len().min(max_tokens)]);
        } else {
            // The host sampler, each step's tokens known before its row.
            let by_host = sampled::by_host(common::generator("tiny-chat", blocks * BLOCK_SIZE), &request);
            assert_eq!(out.completion_ids(), by_host.iter().map(|t| t.token_id).collect::<Vec<_>>());
        }
        let reason = if max_tokens == 96 {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        assert_eq!(out.finish_reason, reason);
        let handed = handed.lock().unwrap();
        assert_eq!(
            (handed.batches.len(), handed.ahead()),
            expected,
            "{sampling:?}, max_tokens {max_tokens}"
        );
        assert_eq!(handed.in_flight, 0, "every step submitted is collected");
    }
}
