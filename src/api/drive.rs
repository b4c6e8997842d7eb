//! Running a request's choices on the engine: submit each, then either wait
//! for all to finish or forward their events as they come, observing
//! latencies on the way. Dropping what this returns aborts the choices.

use super::error::ApiError;
use super::metrics::{Latency, Metrics};
use crate::engine::request::{Event, Finished, Request};
use crate::engine::EngineHandle;
use crate::sampling::SampledToken;
use futures_util::stream::{self, Stream, StreamExt};
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// One finished choice.
pub struct ChoiceOutput {
    pub text: String,
    /// Each token with the text it released.
    pub tokens: Vec<(SampledToken, String)>,
    pub finished: Finished,
}

/// Times one choice's events into the latency histograms.
struct Timer {
    start: Instant,
    last: Option<Instant>,
}

impl Timer {
    fn observe(&mut self, metrics: &Metrics, event: &Event) {
        let now = Instant::now();
        match event {
            Event::Token { .. } => {
                match self.last {
                    None => metrics.observe(Latency::TimeToFirstToken, now - self.start),
                    Some(last) => metrics.observe(Latency::InterToken, now - last),
                }
                self.last = Some(now);
            }
            Event::Finished { finished, .. } => {
                metrics.observe(Latency::EndToEnd, now - self.start);
                metrics.observe(Latency::Queue, finished.queue_time);
            }
            Event::Failed(_) => {}
        }
    }
}

/// The events of every choice, tagged with the choice's index, as they come.
pub fn stream_all(engine: &EngineHandle, requests: Vec<Request>, metrics: Arc<Metrics>) -> impl Stream<Item = (usize, Event)> + Send {
    let start = Instant::now();
    let streams = requests.into_iter().enumerate().map(|(i, request)| {
        let (_, rx) = engine.submit(request);
        let metrics = metrics.clone();
        let mut timer = Timer { start, last: None };
        UnboundedReceiverStream::new(rx).map(move |event| {
            timer.observe(&metrics, &event);
            (i, event)
        })
    });
    stream::select_all(streams)
}

/// Waits for every choice to finish.
pub async fn complete_all(engine: &EngineHandle, requests: Vec<Request>, metrics: Arc<Metrics>) -> Result<Vec<ChoiceOutput>, ApiError> {
    let n = requests.len();
    let mut partial: Vec<(String, Vec<(SampledToken, String)>)> = vec![Default::default(); n];
    let mut done: Vec<Option<ChoiceOutput>> = (0..n).map(|_| None).collect();
    let mut events = std::pin::pin!(stream_all(engine, requests, metrics));
    while let Some((i, event)) = events.next().await {
        match event {
            Event::Token { token, text } => {
                partial[i].0 += &text;
                partial[i].1.push((token, text));
            }
            Event::Finished { text, finished } => {
                let (mut all, tokens) = std::mem::take(&mut partial[i]);
                all += &text;
                done[i] = Some(ChoiceOutput {
                    text: all,
                    tokens,
                    finished,
                });
            }
            Event::Failed(message) => return Err(ApiError::internal(message)),
        }
    }
    done.into_iter()
        .map(|c| c.ok_or_else(|| ApiError::internal("the engine stopped before the request finished")))
        .collect()
}
