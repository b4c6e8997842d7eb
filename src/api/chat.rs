//! `POST /v1/chat/completions`: messages rendered through the model's chat
//! template, generated, and answered as one `chat.completion` or as a stream
//! of `chat.completion.chunk`s. With `tools`, `<tool_call>` blocks in the
//! answer become OpenAI `tool_calls`.

use super::drive::{self, ChoiceOutput};
use super::error::ApiError;
use super::params;
use super::protocol::{ChatChoice, ChatChunkChoice, ChatCompletionRequest, ChatMessage, Response, ToolCall, CHAT_FIELDS, COMMON_FIELDS};
use super::render::{self, chat_logprobs, finish_reason, parse_tool_calls, stop_reason, usage};
use super::{json_object, parse, response_id, unix_now, AppState, InFlight};
use crate::engine::request::{Event, Request};
use crate::engine::stop::StopStrings;
use crate::tokenizer::Tokenizer;
use axum::body::Body;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use futures_util::StreamExt;
use serde_json::Value;
use std::sync::Arc;

/// What every chunk or body of one response shares.
struct Meta {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    tools: bool,
}

impl Meta {
    fn response<C>(&self, object: &'static str, choices: Vec<C>) -> Response<C> {
        Response {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: None,
        }
    }
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Body) -> Result<axum::response::Response, ApiError> {
    let (served, guard) = state.admit()?;
    let map = json_object(&state, body).await?;
    params::reject_unknown_fields(&map, &[COMMON_FIELDS, CHAT_FIELDS])?;
    let req: ChatCompletionRequest = parse(map)?;
    state.check_model(&req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "`messages` must hold at least one message"));
    }
    let top_logprobs = params::logprobs_count("top_logprobs", req.top_logprobs)?;
    if top_logprobs.is_some() && !req.logprobs {
        return Err(ApiError::invalid_param("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
    }
    if req.common.stream_options.is_some() && !req.common.stream {
        return Err(ApiError::invalid_param("stream_options", "`stream_options` needs `stream: true`"));
    }
    let n = params::choices(&req.common)?;
    let sampling = params::sampling(&req.common, req.logprobs.then(|| top_logprobs.unwrap_or(0)), &served.limits)?;
    let prompt_ids = render_prompt(served.tokenizer.clone(), &req).await?;
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let request = params::request(&req.common, max_tokens, None, prompt_ids, sampling, &served.limits)?;
    let meta = Meta {
        id: response_id("chatcmpl"),
        created: unix_now(),
        model: state.options.served_model_name.clone(),
        logprobs: req.logprobs,
        tools: req.tools.as_ref().is_some_and(|t| !t.is_empty()) && req.tool_choice.as_ref().is_none_or(|c| c != "none"),
    };
    let requests = params::fan_out(request, n);
    if req.common.stream {
        let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
        return Ok(stream(state.clone(), guard, requests, meta, include_usage));
    }
    let outputs = drive::complete_all(&served.engine, requests, state.metrics.clone()).await;
    let outputs = state.count_outcome(outputs)?;
    let choices = outputs
        .iter()
        .enumerate()
        .map(|(i, out)| choice(i, out, &meta, &served.tokenizer))
        .collect();
    let mut body = meta.response("chat.completion", choices);
    body.usage = Some(usage(outputs.iter().map(|o| &o.finished), n));
    drop(guard);
    Ok(Json(body).into_response())
}

/// The prompt ids: the chat template rendered and tokenized off the async
/// executor (long conversations take real time).
async fn render_prompt(tokenizer: Arc<Tokenizer>, req: &ChatCompletionRequest) -> Result<Vec<u32>, ApiError> {
    let messages = Value::Array(req.messages.clone());
    let tools = req.tools.clone().map(Value::Array);
    let rendered = tokio::task::spawn_blocking(move || {
        let text = tokenizer.apply_chat_template(&messages, tools.as_ref(), true)?;
        tokenizer.encode(&text)
    })
    .await
    .map_err(|e| ApiError::internal(format!("rendering the prompt: {e}")))?;
    rendered.map_err(|e| ApiError::invalid_param("messages", e.to_string()))
}

fn choice(index: usize, out: &ChoiceOutput, meta: &Meta, tokenizer: &Tokenizer) -> ChatChoice {
    let logprobs = meta
        .logprobs
        .then(|| chat_logprobs(tokenizer, &out.tokens.iter().map(|(t, _)| t).collect::<Vec<_>>()));
    let calls = if meta.tools { parse_tool_calls(&out.text) } else { None };
    let (message, finish) = match calls {
        Some((content, tool_calls)) => (
            ChatMessage {
                role: Some("assistant"),
                content,
                tool_calls: Some(tool_calls),
            },
            "tool_calls",
        ),
        None => (
            ChatMessage {
                role: Some("assistant"),
                content: Some(out.text.clone()),
                tool_calls: None,
            },
            finish_reason(&out.finished),
        ),
    };
    ChatChoice {
        index,
        message,
        logprobs,
        finish_reason: Some(finish),
        stop_reason: stop_reason(&out.finished),
    }
}

/// Per-choice streaming state: with tools, text from `<tool_call>` on is
/// held back and sent as `tool_calls` at the end.
struct ChoiceStream {
    before_calls: StopStrings,
    held: Option<String>,
}

impl ChoiceStream {
    fn new() -> Self {
        ChoiceStream {
            before_calls: StopStrings::new(vec!["<tool_call>".into()]),
            held: None,
        }
    }

    /// The content to send now.
    fn push(&mut self, text: &str) -> String {
        if let Some(held) = &mut self.held {
            held.push_str(text);
            return String::new();
        }
        let released = self.before_calls.push(text);
        if released.stopped_on.is_some() {
            self.held = Some(released.rest);
        }
        released.text
    }

    /// At the end: remaining content, and the tool calls if the held text has them.
    fn finish(&mut self) -> (String, Option<Vec<ToolCall>>) {
        match self.held.take() {
            None => (self.before_calls.flush(), None),
            Some(held) => match parse_tool_calls(&format!("<tool_call>{held}")) {
                Some((_, calls)) => (String::new(), Some(calls)),
                None => (format!("<tool_call>{held}"), None),
            },
        }
    }
}

fn stream(state: Arc<AppState>, guard: InFlight, requests: Vec<Request>, meta: Meta, include_usage: bool) -> axum::response::Response {
    let served = state.served.get().expect("admitted requests have a model");
    let n = requests.len();
    let events = drive::stream_all(&served.engine, requests, state.metrics.clone());
    let tokenizer = served.tokenizer.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let _guard = guard;
        let chunk = |index: usize, delta: ChatMessage, logprobs, finish: Option<&'static str>| {
            let body = meta.response(
                "chat.completion.chunk",
                vec![ChatChunkChoice {
                    index,
                    delta,
                    logprobs,
                    finish_reason: finish,
                }],
            );
            serde_json::to_string(&body).expect("responses serialize")
        };
        for index in 0..n {
            let delta = ChatMessage {
                role: Some("assistant"),
                content: Some(String::new()),
                tool_calls: None,
            };
            if tx.send(chunk(index, delta, None, None)).await.is_err() {
                return;
            }
        }
        let mut streams: Vec<ChoiceStream> = (0..n).map(|_| ChoiceStream::new()).collect();
        let mut finished = vec![None; n];
        let mut events = std::pin::pin!(events);
        while let Some((i, event)) = events.next().await {
            let frames = match event {
                Event::Token { token, text } => {
                    let content = if meta.tools { streams[i].push(&text) } else { text };
                    let logprobs = meta.logprobs.then(|| chat_logprobs(&tokenizer, &[&token]));
                    match content.is_empty() && logprobs.is_none() {
                        true => vec![],
                        false => vec![chunk(
                            i,
                            ChatMessage {
                                content: Some(content),
                                ..Default::default()
                            },
                            logprobs,
                            None,
                        )],
                    }
                }
                Event::Finished { text, finished: f } => {
                    let mut frames = Vec::new();
                    let (content, calls) = match meta.tools {
                        true => {
                            let now = streams[i].push(&text);
                            let (rest, calls) = streams[i].finish();
                            (now + &rest, calls)
                        }
                        false => (text, None),
                    };
                    if !content.is_empty() {
                        frames.push(chunk(
                            i,
                            ChatMessage {
                                content: Some(content),
                                ..Default::default()
                            },
                            None,
                            None,
                        ));
                    }
                    let reason = match calls {
                        Some(mut calls) => {
                            calls.iter_mut().enumerate().for_each(|(k, c)| c.index = Some(k));
                            frames.push(chunk(
                                i,
                                ChatMessage {
                                    tool_calls: Some(calls),
                                    ..Default::default()
                                },
                                None,
                                None,
                            ));
                            "tool_calls"
                        }
                        None => finish_reason(&f),
                    };
                    frames.push(chunk(i, ChatMessage::default(), None, Some(reason)));
                    finished[i] = Some(f);
                    frames
                }
                Event::Failed(message) => {
                    state.metrics.requests_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = tx.send(ApiError::internal(message).body().to_string()).await;
                    let _ = tx.send("[DONE]".into()).await;
                    return;
                }
            };
            for frame in frames {
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
        }
        let Some(all) = finished.into_iter().collect::<Option<Vec<_>>>() else {
            state.metrics.requests_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = tx
                .send(
                    ApiError::internal("the engine stopped before the request finished")
                        .body()
                        .to_string(),
                )
                .await;
            return;
        };
        state.metrics.requests_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if include_usage {
            let mut last = meta.response::<ChatChunkChoice>("chat.completion.chunk", vec![]);
            last.usage = Some(usage(&all, n));
            let _ = tx.send(serde_json::to_string(&last).expect("responses serialize")).await;
        }
        let _ = tx.send("[DONE]".into()).await;
    });
    render::sse(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_text_before_a_tool_call_flows_and_the_call_arrives_at_the_end() {
        let mut s = ChoiceStream::new();
        assert_eq!(s.push("Let me look. <tool"), "Let me look. ");
        assert_eq!(s.push("_call>\n{\"name\": \"get_weather\", "), "");
        assert_eq!(s.push("\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"), "");
        let (rest, calls) = s.finish();
        assert_eq!(rest, "");
        let calls = calls.unwrap();
        assert_eq!(
            (calls[0].function.name.as_str(), calls[0].function.arguments.as_str()),
            ("get_weather", r#"{"city":"Paris"}"#)
        );
    }

    #[test]
    fn a_malformed_call_is_streamed_as_text_after_all() {
        let mut s = ChoiceStream::new();
        assert_eq!(s.push("<tool_call> not json"), "");
        assert_eq!(s.finish(), ("<tool_call> not json".to_string(), None));
        // Text that could begin `<tool_call>` waits; at the end it is plain text.
        let mut plain = ChoiceStream::new();
        assert_eq!(plain.push("a < b"), "a < b");
        assert_eq!(plain.push(" <to"), " ");
        assert_eq!(plain.finish(), ("<to".to_string(), None));
    }
}
