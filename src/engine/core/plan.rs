//! What the engine hands the executor: the next micro-batches, planned
//! from the scheduler's state, and (where the executor looks ahead) the
//! step after the one in flight, before its tokens are back.

use super::{ends_by_length, Engine, InFlightStep};
use crate::backend::{previous_row, BackendError, PagedAttentionMeta, PREVIOUS_SAMPLE};
use crate::engine::scheduler::{Scheduled, SeqId};
use crate::model::{ForwardBatch, Sampling};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl Engine {
    /// Fills the pipeline with new micro-batches, up to the executor's
    /// depth (a sequence in at most one of them); returns the time spent
    /// submitting them.
    pub(super) fn fill_pipeline(&mut self) -> Result<Duration, BackendError> {
        let mut forward = Duration::ZERO;
        let depth = self.executor.depth();
        // With a pipeline, the sequences are shared out over `depth`
        // micro-batches so every stage has one to work on.
        let unfinished = self.scheduler.num_running() + self.scheduler.num_waiting();
        let per_micro_batch = match depth {
            1 => usize::MAX,
            _ => unfinished.min(self.max_num_seqs).div_ceil(depth).max(1),
        };
        while self.in_flight.len() < depth {
            let plan = self.scheduler.schedule_micro_batch(&self.busy, per_micro_batch);
            if plan.is_empty() {
                break;
            }
            forward += self.submit(plan)?;
        }
        Ok(forward)
    }

    /// Plans and submits the step after `step` while `step` is still on
    /// the device: `step`'s plan counts as computed, and each sequence
    /// that samples there and may go on takes its coming token as the
    /// [`PREVIOUS_SAMPLE`] of its row (which its next row's penalties
    /// count on the device). Returns the time spent submitting.
    pub(super) fn plan_ahead(&mut self, step: &mut InFlightStep) -> Result<Duration, BackendError> {
        let (mut ahead, mut last) = (Vec::with_capacity(step.sampled.len()), self.busy.clone());
        for (row, &id) in step.sampled.iter().enumerate() {
            let Some(active) = self.active.get(&id) else { continue };
            let seq = self.scheduler.get(id).expect("active sequences are scheduled");
            match ends_by_length(&active.request, self.context_len, seq.prompt_len, seq.tokens.len() + 1) {
                // Its coming token is its last: nothing more to plan.
                true => _ = last.insert(id),
                false => ahead.push((id, PREVIOUS_SAMPLE | row as u32)),
            }
        }
        step.plan.retain(|p| self.active.contains_key(&p.id));
        self.scheduler.complete(&step.plan);
        step.completed = true;
        for (id, placeholder) in ahead {
            self.scheduler.append_token(id, placeholder);
        }
        let plan = self.scheduler.schedule_micro_batch(&last, usize::MAX);
        match plan.is_empty() {
            true => Ok(Duration::ZERO),
            false => self.submit(plan),
        }
    }

    /// Submits a planned micro-batch; returns the time spent submitting it.
    fn submit(&mut self, plan: Vec<Scheduled>) -> Result<Duration, BackendError> {
        for step in &plan {
            let active = self.active.get_mut(&step.id).expect("scheduled sequences are active");
            if active.queue_time.is_none() {
                active.queue_time = Some(active.arrived.elapsed());
                active.cached_tokens = self.scheduler.get(step.id).map_or(0, |s| s.num_computed);
            }
        }
        let (batch, sampled) = self.build_batch(&plan);
        let submit_started = Instant::now();
        let submitted = self.executor.submit(batch);
        let spent = submit_started.elapsed();
        if let Err(e) = submitted {
            self.stats.last_step_ok.store(false, Ordering::Relaxed);
            return Err(e);
        }
        self.busy.extend(plan.iter().map(|p| p.id));
        self.in_flight.push_back(InFlightStep {
            plan,
            sampled,
            completed: false,
        });
        Ok(spent)
    }

    /// The model input for a plan, and the sequences (in logit-row order)
    /// that get a new token from it; the model samples those tokens.
    fn build_batch(&mut self, plan: &[Scheduled]) -> (ForwardBatch, Vec<SeqId>) {
        let bs = self.scheduler.blocks().block_size();
        let mut batch = ForwardBatch {
            attn: PagedAttentionMeta {
                block_size: bs,
                ..Default::default()
            },
            ..Default::default()
        };
        let (mut sampled, mut rows, mut logits) = (Vec::new(), Vec::new(), false);
        let sampling_started = Instant::now();
        for step in plan {
            let seq = self.scheduler.get(step.id).expect("planned sequences exist");
            let (start, end) = (seq.num_computed, seq.num_computed + step.num_new_tokens);
            batch.token_ids.extend_from_slice(&seq.tokens[start..end]);
            for pos in start..end {
                batch.positions.push(pos as u32);
                batch
                    .attn
                    .slot_mapping
                    .push(seq.block_table[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            batch.attn.query_lens.push(step.num_new_tokens);
            batch.attn.context_lens.push(end);
            batch.attn.block_tables.push(seq.block_table.clone());
            if end == seq.tokens.len() {
                batch.logit_rows.push(batch.token_ids.len() as u32 - 1);
                sampled.push(step.id);
                let sampler = &mut self.active.get_mut(&step.id).expect("planned sequences are active").sampler;
                let coming = seq.tokens.last().and_then(|&t| previous_row(t));
                let known = &seq.tokens[..seq.tokens.len() - coming.is_some() as usize];
                rows.push(sampler.next_row(known, seq.prompt_len, coming));
                logits |= sampler.wants_logits();
            }
        }
        batch.sampling = Sampling::Model { rows, logits };
        self.step_sampling += sampling_started.elapsed();
        (batch, sampled)
    }
}
