//! Pieces of responses both endpoints build: finish and stop reasons, usage,
//! token strings for logprobs, tool calls parsed from the model's text, and
//! the server-sent-events response itself.

use super::protocol::{ChatLogprobs, FunctionCall, PromptTokensDetails, TokenLogprob, ToolCall, TopLogprob, Usage};
use crate::engine::request::{FinishReason, Finished, StopReason};
use crate::sampling::SampledToken;
use crate::tokenizer::Tokenizer;
use axum::http::header;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;

pub fn finish_reason(f: &Finished) -> &'static str {
    match f.reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub fn stop_reason(f: &Finished) -> Option<Value> {
    match &f.stop_reason {
        Some(StopReason::String(s)) => Some(Value::String(s.clone())),
        Some(StopReason::Token(id)) => Some(Value::from(*id)),
        None => None,
    }
}

/// Usage over choices grouped per prompt (`n` choices of one prompt count
/// its tokens once, as OpenAI does).
pub fn usage<'a>(finished: impl IntoIterator<Item = &'a Finished>, choices_per_prompt: usize) -> Usage {
    let (mut prompt, mut completion, mut cached) = (0, 0, 0);
    for (i, f) in finished.into_iter().enumerate() {
        if i % choices_per_prompt == 0 {
            prompt += f.prompt_tokens;
            cached += f.cached_tokens;
        }
        completion += f.completion_tokens;
    }
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: PromptTokensDetails { cached_tokens: cached },
    }
}

/// A token's own text (special tokens spelled out).
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false)
}

pub fn chat_logprobs(tokenizer: &Tokenizer, tokens: &[&SampledToken]) -> ChatLogprobs {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(tokenizer, id);
        (token.as_bytes().to_vec(), token, logprob)
    };
    let content = tokens
        .iter()
        .filter_map(|t| Some((t.token_id, t.logprobs.as_ref()?)))
        .map(|(id, l)| {
            let (bytes, token, logprob) = entry(id, l.logprob);
            let top_logprobs = l
                .top
                .iter()
                .map(|&(id, lp)| {
                    let (bytes, token, logprob) = entry(id, lp);
                    TopLogprob { token, logprob, bytes }
                })
                .collect();
            TokenLogprob {
                token,
                logprob,
                bytes,
                top_logprobs,
            }
        })
        .collect();
    ChatLogprobs { content }
}

/// The tool calls in a model's answer: `<tool_call>{"name", "arguments"}</tool_call>`
/// blocks, as Qwen writes them. Returns the text before the first block
/// (`None` if blank) and the calls, or `None` when there is no well-formed block.
pub fn parse_tool_calls(text: &str) -> Option<(Option<String>, Vec<ToolCall>)> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let first = text.find(OPEN)?;
    let mut calls = Vec::new();
    for block in text[first..].split(OPEN).skip(1) {
        let body = block.split(CLOSE).next().unwrap_or(block).trim();
        let call: Value = serde_json::from_str(body).ok()?;
        let name = call["name"].as_str()?.to_string();
        let arguments = match &call["arguments"] {
            Value::String(s) => s.clone(),
            Value::Null => "{}".to_string(),
            other => other.to_string(),
        };
        let id = super::response_id("call");
        calls.push(ToolCall {
            index: None,
            id,
            kind: "function",
            function: FunctionCall { name, arguments },
        });
    }
    let before = text[..first].trim();
    Some(((!before.is_empty()).then(|| before.to_string()), calls))
}

/// Streams each string from `rx` as one SSE `data:` frame, with headers
/// that keep proxies from buffering.
pub fn sse(rx: tokio::sync::mpsc::Receiver<String>) -> Response {
    let events = ReceiverStream::new(rx).map(|data| Ok::<_, std::convert::Infallible>(Event::default().data(data)));
    let mut response = Sse::new(events).into_response();
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_calls_are_parsed_with_text_before_them() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, calls) = parse_tool_calls(text).unwrap();
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Paris"}"#);
    }

    #[test]
    fn malformed_or_absent_tool_calls_leave_plain_text() {
        assert!(parse_tool_calls("no calls here").is_none());
        assert!(parse_tool_calls("<tool_call>{not json}</tool_call>").is_none());
        let (content, calls) = parse_tool_calls("<tool_call>{\"name\": \"a\", \"arguments\": \"{}\"}").unwrap();
        assert_eq!((content, calls[0].function.arguments.as_str()), (None, "{}"));
    }
}
