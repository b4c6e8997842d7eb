//! The engine loop: schedule a step, run the model on it (which samples
//! each sequence's next token), detokenize, check stops, and queue each
//! request's events. Where the executor looks ahead, the next step is
//! planned and submitted before the last one's tokens are back, each
//! sequence's coming token named as the device's
//! [`PREVIOUS_SAMPLE`](crate::backend::PREVIOUS_SAMPLE) of its row: the device goes from step to step while the host takes the
//! tokens in, and a sequence that stops on that token wastes one step's
//! row. Otherwise a step's tokens are taken in first (with the stops that
//! need no text), the next step is submitted, and only then is the text
//! made and the events queued, so that work overlaps the device's next
//! step. One thread owns all of it
//! (queue, sequences, KV blocks), so nothing here is shared or locked. A
//! step's events leave together ([`Engine::take_outbox`]): waking a
//! client's task costs tens of microseconds, too much to pay per request
//! on the engine thread.

mod plan;

use super::block_manager::BlockManager;
use super::request::{Event, FinishReason, Finished, Request, StopReason};
use super::scheduler::{Scheduled, Scheduler, SchedulerConfig, SeqId, Sequence};
use super::stats::EngineStats;
use super::stop::StopStrings;
use crate::backend::{previous_row, BackendError};
use crate::executor::Executor;
use crate::model::StepOutput;
use crate::sampling::Sampler;
use crate::tokenizer::{DecodeStream, Tokenizer};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub num_kv_blocks: usize,
    pub block_size: usize,
}

/// What the engine keeps per request beside the scheduler's sequence.
struct Active {
    request: Request,
    sampler: Sampler,
    events: UnboundedSender<Event>,
    detokenizer: Option<DecodeStream>,
    stops: StopStrings,
    arrived: Instant,
    queue_time: Option<Duration>,
    cached_tokens: usize,
}

pub struct Engine {
    executor: Box<dyn Executor>,
    scheduler: Scheduler,
    active: HashMap<SeqId, Active>,
    tokenizer: Option<Arc<Tokenizer>>,
    stats: Arc<EngineStats>,
    /// Most tokens a sequence may hold.
    context_len: usize,
    /// Most sequences in flight at once, over all micro-batches.
    max_num_seqs: usize,
    /// Host time spent on sampling in the current step (preparing each
    /// row's sampling, and logprobs).
    step_sampling: Duration,
    /// The current step's output; reused so a large batch's logits buffer
    /// is not allocated and freed every step.
    output: StepOutput,
    /// Events produced since the last [`Engine::take_outbox`].
    outbox: Outbox,
    /// Steps submitted to the executor and not yet collected, oldest first.
    in_flight: VecDeque<InFlightStep>,
    /// Sequences in those steps.
    busy: HashSet<SeqId>,
}

/// A submitted step: its plan, and the sequences (in logit-row order) that
/// get a token from it.
struct InFlightStep {
    plan: Vec<Scheduled>,
    sampled: Vec<SeqId>,
    /// Whether the scheduler already counts the plan computed (done when
    /// the step after it was planned ahead).
    completed: bool,
}

/// A sampled token taken into its sequence, its events still to send.
struct Arrival {
    id: SeqId,
    /// Its row of the step's logits.
    row: usize,
    token_id: u32,
    /// Tokens generated, this one included.
    generated: usize,
    prompt_len: usize,
    /// The stop found without the text, if any.
    ending: Option<(FinishReason, Option<StopReason>)>,
}

/// Whether a sequence of `tokens` tokens (its `prompt_len` prompt and what
/// it generated) is done by `request`'s `max_tokens` or the model's context.
fn ends_by_length(request: &Request, context_len: usize, prompt_len: usize, tokens: usize) -> bool {
    tokens - prompt_len >= request.max_tokens || tokens >= context_len
}

/// Events bound for their requests' channels, in the order produced.
pub type Outbox = Vec<(UnboundedSender<Event>, Event)>;

impl Engine {
    /// An engine over `executor`, whose KV cache holds `config.num_kv_blocks`
    /// blocks of `config.block_size` tokens.
    pub fn new(executor: Box<dyn Executor>, tokenizer: Option<Arc<Tokenizer>>, config: EngineConfig) -> Self {
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens: config.max_num_batched_tokens,
            },
            BlockManager::new(config.num_kv_blocks, config.block_size),
        );
        let stats = Arc::new(EngineStats::default());
        stats.total_blocks.store(config.num_kv_blocks, Ordering::Relaxed);
        let context_len = executor.config().max_position_embeddings;
        let engine = Engine {
            executor,
            scheduler,
            active: HashMap::new(),
            tokenizer,
            stats,
            context_len,
            max_num_seqs: config.max_num_seqs,
            step_sampling: Duration::ZERO,
            output: StepOutput::default(),
            outbox: Vec::new(),
            in_flight: VecDeque::new(),
            busy: HashSet::new(),
        };
        engine.publish_stats();
        engine
    }

    pub fn stats(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work() || !self.in_flight.is_empty()
    }

    /// The events produced since the last call, to deliver in order.
    pub fn take_outbox(&mut self) -> Outbox {
        std::mem::take(&mut self.outbox)
    }

    /// Queues a request, or answers at once with `Failed` if it can never run.
    pub fn add(&mut self, id: SeqId, request: Request, events: UnboundedSender<Event>) {
        let needed = request.prompt_ids.len() + request.max_tokens;
        let blocks = self.scheduler.blocks();
        let capacity = blocks.num_blocks() * blocks.block_size();
        let refusal = if request.prompt_ids.is_empty() {
            Some("the prompt is empty".to_string())
        } else if needed > self.context_len {
            Some(format!(
                "max_tokens {} + prompt {} tokens exceeds the model's {}-token context",
                request.max_tokens,
                request.prompt_ids.len(),
                self.context_len
            ))
        } else if needed > capacity {
            Some(format!(
                "max_tokens {} + prompt {} tokens exceeds the KV cache's {capacity} tokens",
                request.max_tokens,
                request.prompt_ids.len()
            ))
        } else {
            None
        };
        if let Some(message) = refusal {
            self.outbox.push((events, Event::Failed(message)));
            return;
        }
        let active = Active {
            sampler: Sampler::new(request.sampling.clone()),
            detokenizer: self.tokenizer.as_ref().map(|t| DecodeStream::new(t, &request.prompt_ids)),
            stops: StopStrings::new(request.stop.stop_strings.clone()),
            events,
            arrived: Instant::now(),
            queue_time: None,
            cached_tokens: 0,
            request,
        };
        self.scheduler.add(Sequence::new(id, active.request.prompt_ids.clone()));
        self.active.insert(id, active);
        self.publish_stats();
    }

    /// Drops a request and frees its blocks (no further events are sent).
    pub fn abort(&mut self, id: SeqId) {
        self.scheduler.remove(id);
        self.active.remove(&id);
        self.publish_stats();
    }

    /// Fails every request in flight (a step failed; the device state is unknown).
    pub fn fail_all(&mut self, message: &str) {
        self.in_flight.clear();
        self.busy.clear();
        for (id, active) in self.active.drain() {
            self.outbox.push((active.events, Event::Failed(message.to_string())));
            self.scheduler.remove(id);
        }
        self.publish_stats();
    }

    /// Runs one step: fills the pipeline with new micro-batches (up to the
    /// executor's depth, a sequence in at most one of them), plans the
    /// next step ahead where the executor allows, collects the oldest
    /// step's tokens, submits the next micro-batch (unless it went ahead),
    /// then sends what the tokens release.
    pub fn step(&mut self) -> Result<(), BackendError> {
        let started = Instant::now();
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        gone.into_iter().for_each(|id| self.abort(id));
        let mut forward = Duration::ZERO;
        self.step_sampling = Duration::ZERO;
        forward += self.fill_pipeline()?;
        let Some(mut step) = self.in_flight.pop_front() else {
            return Ok(());
        };
        step.plan.iter().for_each(|p| {
            self.busy.remove(&p.id);
        });
        if self.executor.lookahead() {
            forward += self.plan_ahead(&mut step)?;
        }
        let mut output = std::mem::take(&mut self.output);
        let collect_started = Instant::now();
        let result = self.executor.collect(&mut output);
        forward += collect_started.elapsed();
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.last_step_ok.store(result.is_ok(), Ordering::Relaxed);
        if let Err(e) = result {
            self.output = output;
            return Err(e);
        }
        // Requests aborted while their step was in flight are gone.
        let plan: Vec<Scheduled> = step.plan.into_iter().filter(|p| self.active.contains_key(&p.id)).collect();
        if !step.completed {
            self.scheduler.complete(&plan);
        }
        let vocab = self.executor.config().vocab_size;
        let mut arrivals = Vec::with_capacity(step.sampled.len());
        for (row, id) in step.sampled.into_iter().enumerate() {
            if self.active.contains_key(&id) {
                arrivals.push(self.take_token(id, row, output.token_ids[row]));
            }
        }
        self.stats.generation_tokens.fetch_add(arrivals.len() as u64, Ordering::Relaxed);
        let prompt_tokens: usize = plan.iter().map(|p| p.num_new_tokens).sum::<usize>().saturating_sub(arrivals.len());
        self.stats.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        // The next step goes to the device before this one's text is made,
        // so detokenizing and stop strings overlap its work.
        let refilled = self.fill_pipeline();
        for arrival in arrivals {
            let logits = output.row_logits(arrival.row, vocab);
            self.release(arrival, logits);
        }
        self.output = output;
        forward += refilled?;
        self.publish_stats();
        let s = &self.stats;
        let nanos = |d: Duration| d.as_nanos() as u64;
        s.scheduled_seqs.fetch_add(plan.len() as u64, Ordering::Relaxed);
        s.forward_ns.fetch_add(nanos(forward), Ordering::Relaxed);
        s.sampling_ns.fetch_add(nanos(self.step_sampling), Ordering::Relaxed);
        s.overhead_ns.fetch_add(
            nanos(started.elapsed().saturating_sub(forward + self.step_sampling)),
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Appends a sequence's sampled token and decides the stops that need
    /// no text (a stop token, the length): a sequence that ends here leaves
    /// the scheduler at once, so the next step neither holds it nor its
    /// blocks. Its events wait for [`Engine::release`].
    fn take_token(&mut self, id: SeqId, row: usize, token_id: u32) -> Arrival {
        let seq = self.scheduler.get(id).expect("sampled sequences exist");
        // The step after this one was planned with a placeholder for this token.
        let placeholder = seq.tokens.last().is_some_and(|&t| previous_row(t).is_some());
        let (tokens_before, prompt_len) = (seq.tokens.len() - placeholder as usize, seq.prompt_len);
        match placeholder {
            true => self.scheduler.replace_last_token(id, token_id),
            false => self.scheduler.append_token(id, token_id),
        }
        let active = &self.active[&id];
        let stop = &active.request.stop;
        let generated = tokens_before + 1 - prompt_len;
        let ending = if (!stop.ignore_eos && stop.eos_token_ids.contains(&token_id)) || stop.stop_token_ids.contains(&token_id) {
            Some((FinishReason::Stop, Some(StopReason::Token(token_id))))
        } else if ends_by_length(&active.request, self.context_len, prompt_len, tokens_before + 1) {
            Some((FinishReason::Length, None))
        } else {
            None
        };
        if ending.is_some() {
            self.scheduler.remove(id);
        }
        Arrival {
            id,
            row,
            token_id,
            generated,
            prompt_len,
            ending,
        }
    }

    /// Sends what an arrived token releases (its logprobs from its row of
    /// `logits`, when asked, and its text), and ends the sequence on a stop
    /// string or the stop [`Engine::take_token`] found. A stop string found
    /// here ends a sequence the step just submitted holds too; its token
    /// there is dropped when that step is collected.
    fn release(&mut self, arrival: Arrival, logits: Option<&[f32]>) {
        let Arrival {
            id,
            token_id,
            generated,
            prompt_len,
            mut ending,
            ..
        } = arrival;
        let active = self.active.get_mut(&id).expect("arrived sequences are active");
        let sampling_started = Instant::now();
        let token = active.sampler.finish(token_id, logits);
        self.step_sampling += sampling_started.elapsed();
        let piece = match (&self.tokenizer, &mut active.detokenizer) {
            (Some(t), Some(d)) => d.step(t, token_id),
            _ => String::new(),
        };
        let released = active.stops.push(&piece);
        if let Some(s) = released.stopped_on {
            ending = Some((FinishReason::Stop, Some(StopReason::String(s))));
        }
        let event = Event::Token {
            token,
            text: released.text,
        };
        self.outbox.push((active.events.clone(), event));
        let Some((reason, stop_reason)) = ending else {
            return;
        };
        let mut text = String::new();
        if !matches!(stop_reason, Some(StopReason::String(_))) {
            if let (Some(t), Some(d)) = (&self.tokenizer, &mut active.detokenizer) {
                text = active.stops.push(&d.finish(t)).text;
            }
            text += &active.stops.flush();
        }
        let finished = Finished {
            reason,
            stop_reason,
            prompt_tokens: prompt_len,
            completion_tokens: generated,
            cached_tokens: active.cached_tokens,
            queue_time: active.queue_time.unwrap_or_default(),
        };
        self.outbox.push((active.events.clone(), Event::Finished { text, finished }));
        self.abort(id);
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.running.store(self.scheduler.num_running(), Ordering::Relaxed);
        s.waiting.store(self.scheduler.num_waiting(), Ordering::Relaxed);
        s.free_blocks.store(self.scheduler.blocks().num_free(), Ordering::Relaxed);
        s.preemptions.store(self.scheduler.num_preemptions, Ordering::Relaxed);
    }
}
