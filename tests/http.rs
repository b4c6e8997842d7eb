//! `shardline serve` over real HTTP on loopback, against the Hugging Face
//! references: every greedy chat answer word for word (streamed and not)
//! with exact usage, 64 concurrent mixed requests, preemption under a tiny
//! KV cache, abort on disconnect, every error path (503 while loading
//! included), the SIGTERM drain, and a worker rank that panics. Run with
//! `SHARDLINE_TP=2 SHARDLINE_PP=2` in the environment, every server here is
//! split over four ranks.

mod common;

use common::http::{request_at, HttpResponse, Server};
use serde_json::{json, Value};
use std::io::{Read, Write};

fn cases() -> Vec<Value> {
    let path = common::repo().join("tests/fixtures/tiny-chat/reference.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["greedy_chat"].as_array().unwrap().clone()
}

fn chat_body(case: &Value, extra: Value) -> Value {
    let mut messages = vec![];
    if let Some(system) = case["system"].as_str() {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": case["question"]}));
    let mut body = json!({"model": "tiny-chat", "messages": messages, "temperature": 0, "max_tokens": 96});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

fn completion_len(case: &Value) -> u64 {
    case["completion_ids"].as_array().unwrap().len() as u64
}

/// The streamed text, the finish reason, and the usage (`null` without
/// `include_usage`) of an SSE chat response.
fn streamed_chat(resp: &HttpResponse) -> (String, String, Value) {
    let data = resp.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let (id, created) = (&chunks[0]["id"], &chunks[0]["created"]);
    assert!(
        chunks.iter().all(|c| &c["id"] == id && &c["created"] == created),
        "id and created differ between chunks"
    );
    let mut text = String::new();
    let mut finish = String::new();
    for c in &chunks {
        if let Some(choice) = c["choices"].get(0) {
            text += choice["delta"]["content"].as_str().unwrap_or_default();
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    let last = chunks.last().unwrap();
    let usage = if last["choices"] == json!([]) {
        last["usage"].clone()
    } else {
        Value::Null
    };
    (text, finish, usage)
}

#[test]
fn every_greedy_chat_case_word_for_word_streamed_and_not() {
    let server = Server::start(&["--kv-cache-memory", "64MiB"]);
    for case in cases() {
        let want = case["completion_text"].as_str().unwrap();
        let prompt_tokens = case["prompt_ids"].as_array().unwrap().len() as u64;
        let resp = server.post("/v1/chat/completions", &chat_body(&case, json!({})));
        assert_eq!(resp.status, 200, "{}", resp.body);
        let body = resp.json();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["content"], want);
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["prompt_tokens"], prompt_tokens);
        assert_eq!(body["usage"]["completion_tokens"], completion_len(&case));
        assert_eq!(body["usage"]["total_tokens"], prompt_tokens + completion_len(&case));

        let streamed = server.post(
            "/v1/chat/completions",
            &chat_body(&case, json!({"stream": true, "stream_options": {"include_usage": true}})),
        );
        assert_eq!(streamed.status, 200);
        assert_eq!(streamed.header("x-accel-buffering"), Some("no"));
        assert!(streamed.header("content-type").unwrap().starts_with("text/event-stream"));
        let (text, finish, usage) = streamed_chat(&streamed);
        assert_eq!((text.as_str(), finish.as_str()), (want, "stop"));
        assert_eq!(usage["completion_tokens"], completion_len(&case));
        assert_eq!(usage["prompt_tokens"], prompt_tokens);
    }
}

#[test]
fn completions_tokenize_detokenize_and_models() {
    let server = Server::start(&["--kv-cache-memory", "64MiB", "--served-model-name", "tiny"]);
    let case = &cases()[2];
    let prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 96, "temperature": 0, "logprobs": 2});
    let out = server.post("/v1/completions", &body).json();
    assert_eq!(out["object"], "text_completion");
    assert_eq!(out["choices"][0]["text"], case["completion_text"]);
    let lp = &out["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len() as u64, completion_len(case));
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);

    let tokenized = server.post("/tokenize", &json!({"model": "tiny", "prompt": "Hello world"})).json();
    assert_eq!(tokenized["tokens"], json!([9707, 1879]));
    let text = server.post("/detokenize", &json!({"tokens": [9707, 1879]})).json();
    assert_eq!(text["prompt"], "Hello world");
    let models = server.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.get("/ready").status, 200);
}

#[test]
fn the_server_reports_its_limits_and_max_model_len_caps_every_request() {
    let server = Server::start(&["--kv-cache-memory", "64MiB", "--max-model-len", "128"]);
    // The capacity the server logged, in 16-token blocks.
    let logged = server
        .startup
        .iter()
        .find_map(|l| l.strip_prefix("shardline: KV cache of "))
        .unwrap();
    let tokens: f64 = logged.split(' ').next().unwrap().parse().unwrap();
    assert_eq!(server.metric("shardline_kv_cache_blocks") * 16.0, tokens);
    let models = server.get("/v1/models").json();
    assert_eq!(models["data"][0]["max_model_len"], 128);
    let tokenized = server.post("/tokenize", &json!({"prompt": "Hello world"})).json();
    assert_eq!(tokenized["max_model_len"], 128);
    let case = &cases()[2];
    let prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
    let too_long = server.post(
        "/v1/completions",
        &json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 120}),
    );
    let message = format!(
        "max_tokens 120 + prompt {} tokens exceeds the model's 128-token context",
        prompt.len()
    );
    assert_error(&too_long, 400, &message);
    assert_eq!(too_long.json()["error"]["code"], "context_length_exceeded");
    // Without max_tokens a request may run to the end of the context.
    let out = server
        .post(
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": prompt, "temperature": 0}),
        )
        .json();
    assert_eq!(out["choices"][0]["text"], case["completion_text"]);
    assert!(out["usage"]["total_tokens"].as_u64().unwrap() <= 128, "{out}");
}

#[test]
fn sixty_four_concurrent_mixed_requests_match_their_alone_runs() {
    let server = Server::start(&["--kv-cache-memory", "64MiB", "--max-num-batched-tokens", "256"]);
    let cases = cases();
    // Even requests: greedy chat cases (their reference is the alone-run);
    // odd ones: seeded samples, run alone first.
    let seeded = |i: usize| json!({"model": "tiny-chat", "prompt": format!("Story {i}:"), "max_tokens": 8 + i % 24, "temperature": 0.9, "top_k": 40, "seed": i});
    let alone: Vec<Value> = (0..64)
        .filter(|i| i % 2 == 1)
        .map(|i| server.post("/v1/completions", &seeded(i)).json()["choices"][0]["text"].clone())
        .collect();
    let server = std::sync::Arc::new(server);
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let server = server.clone();
            let case = cases[i % cases.len()].clone();
            let body = if i % 2 == 0 {
                chat_body(&case, json!({"stream": i % 4 == 0}))
            } else {
                seeded(i)
            };
            std::thread::spawn(move || {
                let path = if i % 2 == 0 { "/v1/chat/completions" } else { "/v1/completions" };
                (i, case, server.post(path, &body))
            })
        })
        .collect();
    for t in threads {
        let (i, case, resp) = t.join().unwrap();
        assert_eq!(resp.status, 200, "request {i}: {}", resp.body);
        if i % 2 == 1 {
            assert_eq!(resp.json()["choices"][0]["text"], alone[i / 2], "seeded request {i}");
        } else if i % 4 == 0 {
            assert_eq!(streamed_chat(&resp).0, case["completion_text"].as_str().unwrap(), "request {i}");
        } else {
            assert_eq!(
                resp.json()["choices"][0]["message"]["content"],
                case["completion_text"],
                "request {i}"
            );
        }
    }
}

#[test]
fn a_tiny_kv_cache_preempts_and_every_request_completes() {
    // 2 KiB a token on the CPU (f32; 1 KiB in bf16 on a GPU): 384 KiB is 12
    // blocks of 16 tokens (23 on a GPU), far below 30 answers at once.
    let server = std::sync::Arc::new(Server::start(&["--kv-cache-memory", "384KiB"]));
    let threads: Vec<_> = cases()
        .into_iter()
        .map(|case| {
            let server = server.clone();
            std::thread::spawn(move || (server.post("/v1/chat/completions", &chat_body(&case, json!({}))), case))
        })
        .collect();
    for t in threads {
        let (resp, case) = t.join().unwrap();
        assert_eq!(
            resp.json()["choices"][0]["message"]["content"],
            case["completion_text"],
            "{}",
            resp.body
        );
    }
    assert!(server.metric("shardline_preemptions_total") > 0.0);
}

#[test]
fn a_client_that_disconnects_frees_its_request() {
    let server = Server::start(&["--kv-cache-memory", "64MiB"]);
    let body = json!({"model": "tiny-chat", "prompt": "Tell me", "max_tokens": 3000, "ignore_eos": true, "stream": true}).to_string();
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read until tokens flow, so the request is surely running.
    let mut seen = Vec::new();
    while seen.windows(5).filter(|w| w == b"data:").count() < 3 {
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(server.metric("shardline_requests_running"), 1.0);
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.metric("shardline_requests_running") > 0.0 || server.metric("shardline_kv_cache_usage_ratio") > 0.0 {
        assert!(std::time::Instant::now() < deadline, "the abandoned request still runs");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn assert_error(resp: &HttpResponse, status: u16, message_part: &str) {
    assert_eq!(resp.status, status, "{}", resp.body);
    let error = &resp.json()["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "error body lacks {key}: {}", resp.body);
    }
    assert!(
        error["message"].as_str().unwrap().contains(message_part),
        "{message_part:?} not in {}",
        resp.body
    );
}

#[test]
fn every_user_error_is_openai_shaped_with_the_right_status() {
    let server = Server::start(&["--kv-cache-memory", "64MiB", "--api-key", "sekrit", "--max-body-bytes", "4KiB"]);
    let auth = [("Authorization", "Bearer sekrit")];
    let post = |path: &str, body: &str| server.request("POST", path, &auth, body);
    let chat = |extra: Value| post("/v1/chat/completions", &chat_body(&cases()[0], extra).to_string());

    for path in ["/v1/chat/completions", "/v1/completions"] {
        assert_error(&server.request("POST", path, &[], "{}"), 401, "API key");
        assert_error(
            &server.request("POST", path, &[("Authorization", "Bearer wrong")], "{}"),
            401,
            "API key",
        );
    }
    assert_error(&server.request("GET", "/v1/models", &[], ""), 401, "API key");
    assert_eq!(server.request("GET", "/v1/models", &auth, "").status, 200);
    assert_eq!(chat(json!({})).status, 200);

    assert_error(&post("/v1/chat/completions", "{not json"), 400, "malformed JSON");
    assert_error(&post("/v1/chat/completions", "[1, 2]"), 400, "must be a JSON object");
    assert_error(&chat(json!({"temprature": 0.5})), 400, "unknown parameter `temprature`");
    assert_error(&chat(json!({"temperature": -1})), 400, "`temperature` must be between 0 and 2");
    assert_error(&chat(json!({"temperature": "hot"})), 400, "invalid request");
    assert_error(&chat(json!({"top_p": 0})), 400, "`top_p`");
    assert_error(&chat(json!({"n": 100})), 400, "`n` must be between 1 and 16");
    assert_error(
        &chat(json!({"logprobs": true, "top_logprobs": 50})),
        400,
        "`top_logprobs` must be between 0 and 20",
    );
    assert_error(&chat(json!({"top_logprobs": 2})), 400, "needs `logprobs: true`");
    assert_error(&chat(json!({"max_tokens": 0})), 400, "at least 1");
    assert_error(&chat(json!({"stop": [""]})), 400, "stop strings must not be empty");
    assert_error(&chat(json!({"logit_bias": {"999999": 1}})), 400, "not a token id");
    assert_error(
        &chat(json!({"stream_options": {"include_usage": true}})),
        400,
        "needs `stream: true`",
    );
    let resp = chat(json!({"max_tokens": 5000}));
    assert_error(
        &resp,
        400,
        "max_tokens 5000 + prompt 31 tokens exceeds the model's 4096-token context",
    );
    assert_eq!(resp.json()["error"]["code"], "context_length_exceeded");
    let narrator = json!({"model": "tiny-chat", "messages": [{"role": "narrator", "content": "hi"}]}).to_string();
    assert_error(&post("/v1/chat/completions", &narrator), 400, "unknown role: narrator");
    assert_error(
        &post("/v1/chat/completions", &json!({"model": "tiny-chat", "messages": []}).to_string()),
        400,
        "at least one message",
    );
    let completion = |extra: Value| {
        let mut body = json!({"model": "tiny-chat", "prompt": "Hi"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        post("/v1/completions", &body.to_string())
    };
    assert_error(&completion(json!({"logprobs": 50})), 400, "`logprobs` must be between 0 and 20");
    assert_error(&completion(json!({"prompt": [5, 999999]})), 400, "outside the vocabulary");
    assert_error(&completion(json!({"prompt": []})), 400, "must not be an empty list");
    assert_error(&completion(json!({"echo": true})), 400, "`echo` is not supported");
    assert_error(
        &post("/detokenize", &json!({"tokens": [999999]}).to_string()),
        400,
        "outside the vocabulary",
    );

    assert_error(&chat(json!({"model": "gpt-4"})), 404, "the model `gpt-4` does not exist");
    assert_error(&server.request("GET", "/v2/nothing", &auth, ""), 404, "no such route");
    let huge = json!({"model": "tiny-chat", "prompt": "x".repeat(8192)}).to_string();
    assert_error(&post("/v1/completions", &huge), 413, "4096-byte limit");
    // Nothing above disturbed the server.
    assert_eq!(
        chat(json!({})).json()["choices"][0]["message"]["content"],
        cases()[0]["completion_text"]
    );
}

#[test]
fn a_server_still_loading_answers_503_and_reports_not_ready() {
    // The router before `set_served`: what `serve` answers while it loads.
    let state = shardline::api::AppState::new(shardline::api::ServerOptions {
        served_model_name: "tiny-chat".into(),
        api_key: None,
        max_body_bytes: 1 << 20,
        max_waiting: 8,
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(async move { axum::serve(listener, shardline::api::router(state)).await });
    let body = json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}]}).to_string();
    let chat = request_at(addr, "POST", "/v1/chat/completions", &[], &body);
    assert_error(&chat, 503, "still loading");
    assert_error(
        &request_at(addr, "POST", "/tokenize", &[], r#"{"prompt": "Hi"}"#),
        503,
        "still loading",
    );
    assert_eq!(request_at(addr, "GET", "/ready", &[], "").status, 503);
    assert_eq!(request_at(addr, "GET", "/health", &[], "").status, 200);
}

#[test]
fn a_panicking_worker_fails_requests_cleanly_and_the_server_turns_not_ready() {
    // Rank 1 of a tp=2 split panics in its 4th step (warm-up is step 0).
    let server = Server::start(&["--tp", "2", "--pp", "1", "--inject-worker-panic", "1:3"]);
    assert_eq!(server.get("/ready").status, 200);
    let case = &cases()[0];
    let failed = server.post("/v1/chat/completions", &chat_body(case, json!({"max_tokens": 20})));
    assert_error(&failed, 500, "worker rank 1 panicked");
    assert_eq!(server.get("/ready").status, 503);
    // Later requests fail at once instead of hanging; the process stays up.
    let again = server.post("/v1/chat/completions", &chat_body(case, json!({"max_tokens": 2})));
    assert_eq!(again.status, 500, "{}", again.body);
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let server = Server::start(&["--kv-cache-memory", "64MiB", "--max-waiting", "0"]);
    let resp = server.post("/v1/chat/completions", &chat_body(&cases()[0], json!({})));
    assert_error(&resp, 429, "at capacity");
    assert_eq!(resp.header("retry-after"), Some("1"));
}

#[test]
fn sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_zero() {
    let server = Server::start(&["--kv-cache-memory", "64MiB", "--shutdown-timeout", "20"]);
    let addr = server.addr;
    let long = json!({"model": "tiny-chat", "prompt": "Go", "max_tokens": 400, "ignore_eos": true, "temperature": 0}).to_string();
    let in_flight = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{long}", long.len()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    while server.metric("shardline_requests_running") < 1.0 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_error(
        &server.post("/v1/chat/completions", &chat_body(&cases()[0], json!({}))),
        503,
        "shutting down",
    );
    assert_eq!(server.get("/ready").status, 503);
    let finished = in_flight.join().unwrap();
    assert!(finished.starts_with("HTTP/1.1 200"), "{finished}");
    assert!(
        finished.contains("\"completion_tokens\":400"),
        "the in-flight request was cut: {finished}"
    );
    assert_eq!(server.wait(), Some(0));
}
