//! `POST /tokenize` and `POST /detokenize` (vLLM's extensions): the served
//! model's tokenizer, for clients that count or build token ids themselves.

use super::error::ApiError;
use super::{json_object, AppState};
use axum::body::Body;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Value>>,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

pub async fn tokenize(State(state): State<Arc<AppState>>, body: Body) -> Result<Json<Value>, ApiError> {
    let served = state
        .served
        .get()
        .ok_or_else(|| ApiError::unavailable("the model is still loading"))?;
    let req: TokenizeRequest = super::parse(json_object(&state, body).await?)?;
    if let Some(model) = &req.model {
        state.check_model(model)?;
    }
    let tokenizer = served.tokenizer.clone();
    let ids = tokio::task::spawn_blocking(move || match (req.prompt, req.messages) {
        (Some(prompt), None) => tokenizer
            .encode(&prompt)
            .map_err(|e| ApiError::invalid_param("prompt", e.to_string())),
        (None, Some(messages)) => tokenizer
            .apply_chat_template(&Value::Array(messages), None, req.add_generation_prompt)
            .and_then(|text| tokenizer.encode(&text))
            .map_err(|e| ApiError::invalid_param("messages", e.to_string())),
        _ => Err(ApiError::bad_request("give exactly one of `prompt` and `messages`")),
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))??;
    Ok(Json(
        json!({"count": ids.len(), "max_model_len": served.limits.context_len, "tokens": ids}),
    ))
}

pub async fn detokenize(State(state): State<Arc<AppState>>, body: Body) -> Result<Json<Value>, ApiError> {
    let served = state
        .served
        .get()
        .ok_or_else(|| ApiError::unavailable("the model is still loading"))?;
    let req: DetokenizeRequest = super::parse(json_object(&state, body).await?)?;
    if let Some(model) = &req.model {
        state.check_model(model)?;
    }
    let vocab = served.limits.vocab_size;
    if let Some(id) = req.tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid_param(
            "tokens",
            format!("token id {id} is outside the vocabulary of {vocab}"),
        ));
    }
    Ok(Json(json!({"prompt": served.tokenizer.decode(&req.tokens, false)})))
}
