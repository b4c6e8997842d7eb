//! The Qwen2 tokenizer and chat template against Hugging Face: every
//! `tokenizer_cases.json` case encodes, decodes and renders exactly, and the
//! incremental detokenizer emits exactly the full decode, one whole character
//! at a time, even where a character's bytes span several tokens.

mod common;

use serde_json::Value;
use shardline::tokenizer::{DecodeStream, Tokenizer};

fn cases() -> Value {
    let path = common::repo().join("tests/fixtures/qwen2-tokenizer/tokenizer_cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&common::model_dir("tiny-chat")).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn every_encode_case_matches() {
    let t = tokenizer();
    for case in cases()["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(t.encode(text).unwrap(), ids(&case["ids"]), "encode {text:?}");
    }
}

#[test]
fn every_decode_case_matches() {
    let t = tokenizer();
    for case in cases()["decode"].as_array().unwrap() {
        let skip = case["skip_special_tokens"].as_bool().unwrap();
        assert_eq!(t.decode(&ids(&case["ids"]), skip), case["text"].as_str().unwrap());
    }
}

#[test]
fn every_chat_case_renders_the_same_text_and_ids() {
    let t = tokenizer();
    for case in cases()["chat"].as_array().unwrap() {
        let tools = case.get("tools");
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let text = t.apply_chat_template(&case["messages"], tools, add).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap());
        assert_eq!(t.encode(&text).unwrap(), ids(&case["ids"]));
    }
}

#[test]
fn an_unknown_role_raises_the_templates_own_error() {
    let messages = serde_json::json!([{"role": "narrator", "content": "hi"}]);
    let err = tokenizer().apply_chat_template(&messages, None, true).unwrap_err();
    assert_eq!(err.to_string(), "chat template: unknown role: narrator");
}

#[test]
fn incremental_detokenization_equals_the_full_decode_and_never_splits_a_character() {
    let t = tokenizer();
    for case in cases()["decode"].as_array().unwrap() {
        let ids = ids(&case["ids"]);
        let mut stream = DecodeStream::new(&t, &[]);
        let mut pieces: Vec<String> = ids.iter().map(|&id| stream.step(&t, id)).collect();
        pieces.push(stream.finish(&t));
        assert!(
            pieces.iter().all(|p| !p.contains('\u{FFFD}')),
            "a piece holds half a character: {pieces:?}"
        );
        assert_eq!(pieces.concat(), case["text"].as_str().unwrap());
    }
    // " 🚀" is three tokens (11162 = space and the emoji's first byte, 248,
    // 222): the space at once, then nothing, then the whole emoji.
    let mut stream = DecodeStream::new(&t, &[37523]);
    let pieces: Vec<String> = [11162, 248, 222].iter().map(|&id| stream.step(&t, id)).collect();
    assert_eq!(pieces, [" ", "", "🚀"]);
}

#[test]
fn each_tokens_bytes_read_as_the_library_decodes_it() {
    let t = tokenizer();
    let ids = (0..151_640).step_by(7).chain(151_640..151_670);
    for id in ids {
        let bytes = t.token_bytes(id).expect("Qwen2's decoder is byte-level");
        assert_eq!(String::from_utf8_lossy(bytes), t.decode(&[id], true), "id {id}");
    }
}

#[test]
fn a_prompt_ending_inside_a_character_does_not_swallow_the_completion() {
    let t = tokenizer();
    // The prompt holds the first byte of 🚀; the completion brings the rest, then text.
    let mut stream = DecodeStream::new(&t, &[37523, 11162]);
    let mut text: String = [248, 222, 323].iter().map(|&id| stream.step(&t, id)).collect();
    text += &stream.finish(&t);
    assert_eq!(text, t.decode(&[248, 222, 323], true));
    assert!(text.ends_with(" and"), "{text:?}");
}
