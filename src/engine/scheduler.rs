//! Continuous batching: which sequences run in the next step, and how many of
//! their tokens.
//!
//! Each step serves running sequences first (a decode token each, or the next
//! chunk of an unfinished prefill), then admits waiting ones in arrival order
//! while the token budget (`max_num_batched_tokens`) and `max_num_seqs`
//! allow, splitting long prompts into chunks. A new sequence first takes the
//! cached blocks of its longest known prefix. When blocks run out, the newest
//! running sequence is preempted: its blocks are freed and it goes back to
//! the head of the queue, to be recomputed (prompt and output so far) later.

use super::block_manager::{BlockId, BlockManager};
use std::collections::{HashSet, VecDeque};

pub type SeqId = u64;

/// What the scheduler tracks of a sequence: its tokens and its KV blocks.
#[derive(Debug)]
pub struct Sequence {
    pub id: SeqId,
    /// The prompt, then every generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose keys and values are in the cache.
    pub num_computed: usize,
    pub block_table: Vec<BlockId>,
    /// Prefix hashes of the full, computed blocks, registered for reuse.
    block_hashes: Vec<u64>,
}

impl Sequence {
    pub fn new(id: SeqId, prompt: Vec<u32>) -> Self {
        let prompt_len = prompt.len();
        Sequence {
            id,
            tokens: prompt,
            prompt_len,
            num_computed: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
        }
    }

    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    fn reset(&mut self) {
        self.num_computed = 0;
        self.block_table.clear();
        self.block_hashes.clear();
    }
}

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// One sequence's share of a step: its next `num_new_tokens` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    pub num_new_tokens: usize,
}

pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    /// In admission order: the newest is last, and preempted first.
    running: Vec<Sequence>,
    pub num_preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        assert!(config.max_num_seqs > 0 && config.max_num_batched_tokens > 0);
        Scheduler {
            config,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.running.iter().chain(&self.waiting).find(|s| s.id == id)
    }

    fn get_mut(&mut self, id: SeqId) -> &mut Sequence {
        self.running
            .iter_mut()
            .chain(&mut self.waiting)
            .find(|s| s.id == id)
            .expect("tokens are sampled for scheduled sequences")
    }

    /// Adds a sampled token to a sequence (running, or preempted since
    /// its step was planned).
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        self.get_mut(id).tokens.push(token);
    }

    /// Puts a sampled token in place of a sequence's last token, the
    /// placeholder a step planned before it was known took it by.
    pub fn replace_last_token(&mut self, id: SeqId, token: u32) {
        let last = self.get_mut(id).tokens.last_mut().expect("a sequence holds its prompt");
        *last = token;
    }

    /// Removes a sequence wherever it is and frees its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let seq = match self.running.iter().position(|s| s.id == id) {
            Some(i) => self.running.remove(i),
            None => self.waiting.remove(self.waiting.iter().position(|s| s.id == id)?)?,
        };
        self.blocks.free_table(&seq.block_table);
        Some(seq)
    }

    /// Plans the next step. Every scheduled sequence has the blocks its new
    /// tokens need.
    pub fn schedule(&mut self) -> Vec<Scheduled> {
        self.schedule_micro_batch(&HashSet::new(), usize::MAX)
    }

    /// Plans a step of at most `max_seqs` sequences that leaves out the
    /// `busy` ones (those in a step still in flight through the pipeline):
    /// they are neither scheduled nor preempted.
    pub fn schedule_micro_batch(&mut self, busy: &HashSet<SeqId>, max_seqs: usize) -> Vec<Scheduled> {
        let mut budget = self.config.max_num_batched_tokens;
        let mut plan = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 && plan.len() < max_seqs {
            let seq = &self.running[i];
            if busy.contains(&seq.id) {
                i += 1;
                continue;
            }
            let n = (seq.tokens.len() - seq.num_computed).min(budget);
            let needed = self.blocks.blocks_for(seq.num_computed + n) - seq.block_table.len();
            while self.blocks.num_free() < needed {
                // The newest idle sequence after this one gives way.
                let Some(newest) = (i + 1..self.running.len()).rev().find(|&j| !busy.contains(&self.running[j].id)) else {
                    break;
                };
                let victim = self.running.remove(newest);
                self.preempt(victim);
            }
            if self.blocks.num_free() < needed {
                let this = self.running.remove(i);
                self.preempt(this);
                continue;
            }
            self.grow(i, needed);
            plan.push(Scheduled {
                id: self.running[i].id,
                num_new_tokens: n,
            });
            budget -= n;
            i += 1;
        }
        while budget > 0 && self.running.len() < self.config.max_num_seqs && plan.len() < max_seqs {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            if seq.block_table.is_empty() {
                self.take_cached_prefix(&mut seq);
            }
            let n = (seq.tokens.len() - seq.num_computed).min(budget);
            let needed = self.blocks.blocks_for(seq.num_computed + n) - seq.block_table.len();
            if self.blocks.num_free() < needed {
                self.blocks.free_table(&seq.block_table);
                seq.reset();
                self.waiting.push_front(seq);
                break;
            }
            self.running.push(seq);
            self.grow(self.running.len() - 1, needed);
            plan.push(Scheduled {
                id: self.running.last().expect("just pushed").id,
                num_new_tokens: n,
            });
            budget -= n;
        }
        plan
    }

    /// Records that the planned tokens are computed, and registers every
    /// block they filled for prefix reuse.
    pub fn complete(&mut self, plan: &[Scheduled]) {
        let bs = self.blocks.block_size();
        for step in plan {
            let seq = self.running.iter_mut().find(|s| s.id == step.id).expect("planned sequences run");
            seq.num_computed += step.num_new_tokens;
            let full = seq.num_computed / bs;
            while seq.block_hashes.len() < full {
                let b = seq.block_hashes.len();
                let parent = seq.block_hashes.last().copied();
                let hash = self.blocks.chain_hash(parent, &seq.tokens[b * bs..(b + 1) * bs]);
                self.blocks.register_full(seq.block_table[b], hash);
                seq.block_hashes.push(hash);
            }
        }
    }

    fn grow(&mut self, index: usize, blocks: usize) {
        for _ in 0..blocks {
            let block = self.blocks.allocate().expect("checked free blocks before growing");
            self.running[index].block_table.push(block);
        }
    }

    /// Shares the cached blocks of the longest known prefix, keeping at least
    /// one token to compute (its logits are needed).
    fn take_cached_prefix(&mut self, seq: &mut Sequence) {
        let bs = self.blocks.block_size();
        let mut hashes = self.blocks.prefix_hashes(&seq.tokens);
        hashes.truncate((seq.tokens.len() - 1) / bs);
        seq.block_table = self.blocks.reuse_cached_prefix(&hashes);
        seq.num_computed = seq.block_table.len() * bs;
        hashes.truncate(seq.block_table.len());
        seq.block_hashes = hashes;
    }

    fn preempt(&mut self, mut seq: Sequence) {
        self.blocks.free_table(&seq.block_table);
        seq.reset();
        self.num_preemptions += 1;
        self.waiting.push_front(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(blocks: usize, max_num_seqs: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_seqs,
                max_num_batched_tokens: budget,
            },
            BlockManager::new(blocks, 4),
        )
    }

    /// Runs one step as the engine would: plan, compute, sample `next` for
    /// sequences whose known tokens are all computed.
    fn step(s: &mut Scheduler, next: u32) -> Vec<Scheduled> {
        let plan = s.schedule();
        s.complete(&plan);
        for p in &plan {
            let seq = s.get(p.id).unwrap();
            if seq.num_computed == seq.tokens.len() {
                s.append_token(p.id, next);
            }
        }
        plan
    }

    #[test]
    fn micro_batches_share_out_sequences_and_never_touch_busy_ones() {
        // 5 blocks of 4 tokens: four 3-token prompts take one block each.
        let mut s = scheduler(5, 8, 64);
        for id in 0..4 {
            s.add(Sequence::new(id, vec![1, 2, 3]));
        }
        let first = s.schedule_micro_batch(&HashSet::new(), 2);
        assert_eq!(first.iter().map(|p| p.id).collect::<Vec<_>>(), vec![0, 1]);
        let busy: HashSet<SeqId> = first.iter().map(|p| p.id).collect();
        let second = s.schedule_micro_batch(&busy, 2);
        assert_eq!(second.iter().map(|p| p.id).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn preemption_skips_sequences_whose_step_is_in_flight() {
        // Five 4-token blocks; four full 4-token prompts leave one free.
        let mut s = scheduler(5, 8, 64);
        for id in 0..4 {
            s.add(Sequence::new(id, vec![1, 2, 3, 4]));
        }
        step(&mut s, 7);
        // Each now needs a second block; sequence 3 is in flight.
        let plan = s.schedule_micro_batch(&[3].into_iter().collect(), 8);
        // 0 takes the free block; 1 gets sequence 2's (the newest idle one), not 3's.
        assert_eq!(plan.iter().map(|p| p.id).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(s.num_preemptions, 1);
        assert_eq!(s.num_running(), 3);
        assert_eq!(s.get(2).unwrap().num_computed, 0);
        assert_eq!(s.get(3).unwrap().num_computed, 4);
    }

    #[test]
    fn long_prompts_are_chunked_under_the_token_budget() {
        let mut s = scheduler(16, 4, 8);
        s.add(Sequence::new(1, (0..20).collect()));
        assert_eq!(step(&mut s, 99), vec![Scheduled { id: 1, num_new_tokens: 8 }]);
        assert_eq!(step(&mut s, 99), vec![Scheduled { id: 1, num_new_tokens: 8 }]);
        assert_eq!(step(&mut s, 99), vec![Scheduled { id: 1, num_new_tokens: 4 }]);
        assert_eq!(s.get(1).unwrap().output(), [99]);
        assert_eq!(step(&mut s, 98), vec![Scheduled { id: 1, num_new_tokens: 1 }]);
    }

    #[test]
    fn decodes_go_first_then_prefills_fill_the_budget_up_to_max_num_seqs() {
        let mut s = scheduler(32, 2, 10);
        s.add(Sequence::new(1, vec![1, 2, 3]));
        step(&mut s, 7);
        s.add(Sequence::new(2, (0..20).collect()));
        s.add(Sequence::new(3, vec![5]));
        let plan = step(&mut s, 7);
        assert_eq!(
            plan,
            vec![Scheduled { id: 1, num_new_tokens: 1 }, Scheduled { id: 2, num_new_tokens: 9 }]
        );
        assert_eq!(s.num_waiting(), 1, "max_num_seqs keeps sequence 3 waiting");
    }

    #[test]
    fn the_newest_sequence_is_preempted_when_blocks_run_out_and_recomputed_later() {
        // 3 blocks of 4 tokens: two 4-token prompts fit, then decoding needs more.
        let mut s = scheduler(3, 4, 64);
        s.add(Sequence::new(1, vec![1, 2, 3, 4]));
        s.add(Sequence::new(2, vec![5, 6, 7, 8]));
        step(&mut s, 9);
        let plan = step(&mut s, 9);
        assert_eq!(plan, vec![Scheduled { id: 1, num_new_tokens: 1 }]);
        assert_eq!(s.num_preemptions, 1);
        let preempted = s.get(2).unwrap();
        assert_eq!(
            (preempted.num_computed, preempted.output()),
            (0, &[9][..]),
            "keeps its output, loses its cache"
        );
        s.remove(1);
        // Back in: its full prompt block is still cached, so only the output
        // token is recomputed; then it decodes on.
        assert_eq!(step(&mut s, 10), vec![Scheduled { id: 2, num_new_tokens: 1 }]);
        assert_eq!(s.get(2).unwrap().num_computed, 5);
        assert_eq!(s.get(2).unwrap().output(), [9, 10]);
    }

    #[test]
    fn a_repeated_prefix_is_computed_once() {
        let mut s = scheduler(16, 4, 64);
        let system: Vec<u32> = (100..112).collect(); // three full blocks
        s.add(Sequence::new(1, [system.clone(), vec![1, 2]].concat()));
        step(&mut s, 0);
        s.add(Sequence::new(2, [system.clone(), vec![3]].concat()));
        let plan = s.schedule();
        assert!(plan.contains(&Scheduled { id: 2, num_new_tokens: 1 }), "{plan:?}");
        let (a, b) = (s.get(1).unwrap(), s.get(2).unwrap());
        assert_eq!(a.block_table[..3], b.block_table[..3]);
    }

    #[test]
    fn a_fully_cached_prompt_still_computes_its_last_token() {
        let mut s = scheduler(16, 4, 64);
        let prompt: Vec<u32> = (0..8).collect();
        s.add(Sequence::new(1, prompt.clone()));
        step(&mut s, 0);
        s.remove(1);
        s.add(Sequence::new(2, prompt));
        assert_eq!(s.schedule(), vec![Scheduled { id: 2, num_new_tokens: 4 }]);
    }

    #[test]
    fn removing_a_sequence_frees_its_blocks() {
        let mut s = scheduler(8, 4, 64);
        s.add(Sequence::new(1, (0..10).collect()));
        step(&mut s, 0);
        assert_eq!(s.blocks().num_free(), 5);
        s.remove(1);
        assert_eq!(s.blocks().num_free(), 8);
        assert!(!s.has_work());
    }
}
