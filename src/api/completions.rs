//! `POST /v1/completions`: raw prompts (text or token ids, one or several)
//! continued as they are, answered as one `text_completion` or a stream of
//! them. Choice `p·n + j` is the `j`-th of the `n` choices of prompt `p`.

use super::drive::{self, ChoiceOutput};
use super::error::ApiError;
use super::params;
use super::protocol::{CompletionChoice, CompletionLogprobs, CompletionRequest, Prompt, Response, COMMON_FIELDS, COMPLETION_FIELDS};
use super::render::{self, finish_reason, stop_reason, token_text, usage};
use super::{json_object, parse, response_id, unix_now, AppState};
use crate::engine::request::Event;
use crate::sampling::SampledToken;
use crate::tokenizer::Tokenizer;
use axum::body::Body;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// OpenAI's default when `max_tokens` is absent.
const DEFAULT_MAX_TOKENS: usize = 16;

pub async fn completions(State(state): State<Arc<AppState>>, body: Body) -> Result<axum::response::Response, ApiError> {
    let (served, guard) = state.admit()?;
    let map = json_object(&state, body).await?;
    params::reject_unknown_fields(&map, &[COMMON_FIELDS, COMPLETION_FIELDS])?;
    let req: CompletionRequest = parse(map)?;
    state.check_model(&req.model)?;
    if req.echo {
        return Err(ApiError::invalid_param("echo", "`echo` is not supported"));
    }
    if req.suffix.is_some() {
        return Err(ApiError::invalid_param("suffix", "`suffix` is not supported"));
    }
    let n = params::choices(&req.common)?;
    if req.best_of.is_some_and(|b| b != n as i64) {
        return Err(ApiError::invalid_param("best_of", "`best_of` other than `n` is not supported"));
    }
    if req.common.stream_options.is_some() && !req.common.stream {
        return Err(ApiError::invalid_param("stream_options", "`stream_options` needs `stream: true`"));
    }
    let logprobs = params::logprobs_count("logprobs", req.logprobs)?;
    let sampling = params::sampling(&req.common, logprobs, &served.limits)?;
    let prompts = tokenize_prompts(served.tokenizer.clone(), req.prompt.clone()).await?;
    let mut requests = Vec::new();
    for ids in prompts {
        let r = params::request(
            &req.common,
            req.common.max_tokens,
            Some(DEFAULT_MAX_TOKENS),
            ids,
            sampling.clone(),
            &served.limits,
        )?;
        requests.extend(params::fan_out(r, n));
    }
    let head = Response::<CompletionChoice> {
        id: response_id("cmpl"),
        object: "text_completion",
        created: unix_now(),
        model: state.options.served_model_name.clone(),
        choices: vec![],
        usage: None,
    };
    let tokenizer = served.tokenizer.clone();
    if req.common.stream {
        let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
        let total = requests.len();
        let events = drive::stream_all(&served.engine, requests, state.metrics.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
        let state = state.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let frame = |choice: CompletionChoice| {
                serde_json::to_string(&Response {
                    choices: vec![choice],
                    ..head.clone()
                })
                .expect("serializes")
            };
            let mut finished = vec![None; total];
            let mut events = std::pin::pin!(events);
            while let Some((i, event)) = events.next().await {
                let data = match event {
                    Event::Token { token, text } => {
                        let logprobs = logprobs.map(|_| completion_logprobs(&tokenizer, &[(token, text.clone())], 0));
                        if text.is_empty() && logprobs.is_none() {
                            continue;
                        }
                        frame(CompletionChoice {
                            index: i,
                            text,
                            logprobs,
                            finish_reason: None,
                            stop_reason: None,
                        })
                    }
                    Event::Finished { text, finished: f } => {
                        let data = frame(CompletionChoice {
                            index: i,
                            text,
                            logprobs: None,
                            finish_reason: Some(finish_reason(&f)),
                            stop_reason: stop_reason(&f),
                        });
                        finished[i] = Some(f);
                        data
                    }
                    Event::Failed(message) => {
                        state.metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.send(ApiError::internal(message).body().to_string()).await;
                        let _ = tx.send("[DONE]".into()).await;
                        return;
                    }
                };
                if tx.send(data).await.is_err() {
                    return;
                }
            }
            let Some(all) = finished.into_iter().collect::<Option<Vec<_>>>() else {
                state.metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
                let _ = tx
                    .send(
                        ApiError::internal("the engine stopped before the request finished")
                            .body()
                            .to_string(),
                    )
                    .await;
                return;
            };
            state.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
            if include_usage {
                let last = Response {
                    usage: Some(usage(&all, n)),
                    ..head
                };
                let _ = tx.send(serde_json::to_string(&last).expect("serializes")).await;
            }
            let _ = tx.send("[DONE]".into()).await;
        });
        return Ok(render::sse(rx));
    }
    let outputs = drive::complete_all(&served.engine, requests, state.metrics.clone()).await;
    let outputs = state.count_outcome(outputs)?;
    let choices = outputs
        .iter()
        .enumerate()
        .map(|(index, out)| CompletionChoice {
            index,
            text: out.text.clone(),
            logprobs: logprobs.map(|_| completion_logprobs(&tokenizer, &out.tokens, 0)),
            finish_reason: Some(finish_reason(&out.finished)),
            stop_reason: stop_reason(&out.finished),
        })
        .collect();
    let usage = usage(outputs.iter().map(|o: &ChoiceOutput| &o.finished), n);
    drop(guard);
    Ok(Json(Response {
        choices,
        usage: Some(usage),
        ..head
    })
    .into_response())
}

/// Every prompt as token ids; texts are tokenized off the async executor.
async fn tokenize_prompts(tokenizer: Arc<Tokenizer>, prompt: Prompt) -> Result<Vec<Vec<u32>>, ApiError> {
    let texts = match prompt {
        Prompt::Ids(ids) => return Ok(vec![ids]),
        Prompt::IdLists(lists) if !lists.is_empty() => return Ok(lists),
        Prompt::Text(text) => vec![text],
        Prompt::Texts(texts) if !texts.is_empty() => texts,
        _ => return Err(ApiError::invalid_param("prompt", "`prompt` must not be an empty list")),
    };
    let encoded = tokio::task::spawn_blocking(move || texts.iter().map(|t| tokenizer.encode(t)).collect::<Result<Vec<_>, _>>())
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?;
    encoded.map_err(|e| ApiError::invalid_param("prompt", e.to_string()))
}

/// OpenAI's legacy logprobs: per token its string, logprob, the top
/// alternatives and its character offset in the text (from `offset`).
fn completion_logprobs(tokenizer: &Tokenizer, tokens: &[(SampledToken, String)], offset: usize) -> CompletionLogprobs {
    let mut at = offset;
    let mut out = CompletionLogprobs {
        tokens: vec![],
        token_logprobs: vec![],
        top_logprobs: vec![],
        text_offset: vec![],
    };
    for (token, text) in tokens {
        let Some(l) = &token.logprobs else { continue };
        out.tokens.push(token_text(tokenizer, token.token_id));
        out.token_logprobs.push(l.logprob);
        out.top_logprobs.push(
            l.top
                .iter()
                .map(|&(id, lp)| (token_text(tokenizer, id), lp))
                .collect::<HashMap<_, _>>(),
        );
        out.text_offset.push(at);
        at += text.chars().count();
    }
    out
}
