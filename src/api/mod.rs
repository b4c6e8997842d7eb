//! The OpenAI-compatible HTTP API (axum). Requests are parsed, authenticated
//! and validated here, once; the engine sees only valid requests, and every
//! error a client can cause leaves from here, OpenAI-shaped.

mod chat;
mod completions;
mod drive;
pub mod error;
mod metrics;
mod params;
mod protocol;
mod render;
mod tokens;

pub use params::Limits;

use crate::engine::EngineHandle;
use crate::tokenizer::Tokenizer;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use error::ApiError;
use metrics::Metrics;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use subtle::ConstantTimeEq;

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub served_model_name: String,
    /// Every `/v1` route requires `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// Requests allowed to wait for a batch slot before new ones get 429.
    pub max_waiting: usize,
}

/// The model once it is loaded and has decoded a token.
pub struct Served {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub limits: Limits,
    /// Unix seconds when loading finished (`/v1/models`' `created`).
    pub created: u64,
}

pub struct AppState {
    pub options: ServerOptions,
    served: OnceLock<Served>,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl AppState {
    pub fn new(options: ServerOptions) -> Arc<Self> {
        Arc::new(AppState {
            options,
            served: OnceLock::new(),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            metrics: Arc::default(),
        })
    }

    /// Makes the model available; requests before this get 503.
    pub fn set_served(&self, served: Served) {
        if self.served.set(served).is_err() {
            panic!("the model is served once");
        }
    }

    /// Stops admitting requests (503); those in flight continue.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
            && self
                .served
                .get()
                .is_some_and(|s| s.engine.stats().last_step_ok.load(Ordering::Relaxed))
    }

    /// The model, if a new generation request may start now.
    fn admit(self: &Arc<Self>) -> Result<(&Served, InFlight), ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        let served = self
            .served
            .get()
            .ok_or_else(|| ApiError::unavailable("the model is still loading"))?;
        let waiting = served.engine.stats().waiting.load(Ordering::Relaxed);
        if waiting >= self.options.max_waiting {
            self.metrics.requests_rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::overloaded(waiting));
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Ok((served, InFlight(self.clone())))
    }

    /// Counts a finished non-streamed request by outcome.
    fn count_outcome(&self, outputs: Result<Vec<drive::ChoiceOutput>, ApiError>) -> Result<Vec<drive::ChoiceOutput>, ApiError> {
        let counter = if outputs.is_ok() {
            &self.metrics.requests_ok
        } else {
            &self.metrics.requests_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        outputs
    }

    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        match model == self.options.served_model_name {
            true => Ok(()),
            false => Err(ApiError::model_not_found(model, &self.options.served_model_name)),
        }
    }
}

/// Counts a generation request as in flight until dropped (for the drain).
pub struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
}

async fn authenticate(State(state): State<Arc<AppState>>, headers: HeaderMap, request: Request, next: Next) -> Response {
    if let Some(key) = &state.options.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let matches = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(key.as_bytes())));
        if !matches {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let served = state
        .served
        .get()
        .ok_or_else(|| ApiError::unavailable("the model is still loading"))?;
    let name = &state.options.served_model_name;
    Ok(Json(json!({
        "object": "list",
        "data": [{"id": name, "object": "model", "created": served.created, "owned_by": "shardline",
                  "max_model_len": served.limits.context_len}],
    })))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match state.is_ready() {
        true => (StatusCode::OK, "ready").into_response(),
        false => ApiError::unavailable("not ready: loading, draining, or the last step failed").into_response(),
    }
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(state.served.get().map(|s| s.engine.stats()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// A JSON object body, at most `max_body_bytes` long.
async fn json_object(state: &AppState, body: Body) -> Result<Map<String, Value>, ApiError> {
    let limit = state.options.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::payload_too_large(limit))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("the request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("malformed JSON body: {e}"))),
    }
}

/// Deserializes a checked body into its request type.
fn parse<T: serde::de::DeserializeOwned>(map: Map<String, Value>) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(map)).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

/// Unix time in seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A response id: `prefix` and 24 random hex digits.
fn response_id(prefix: &str) -> String {
    let mut rng = crate::rng::Rng::from_entropy();
    format!("{prefix}-{:016x}{:08x}", rng.next_u64(), rng.next_u64() as u32)
}
