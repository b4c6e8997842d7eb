//! tiny-chat answers every `greedy_chat` case of the Hugging Face reference
//! word for word on the CPU backend (tests/common/chat.rs).

mod common;

#[test]
fn tiny_chat_answers_all_greedy_chat_cases_word_for_word() {
    common::chat::answers_every_greedy_chat_case(common::load("tiny-chat"));
}
