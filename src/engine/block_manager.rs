//! The KV cache's blocks: which are free, who shares which, and which full
//! blocks can be reused by a new sequence with the same prefix.
//!
//! A block holds `block_size` tokens' keys and values. A block whose tokens
//! are all computed is registered under a hash of its tokens chained with the
//! hash of the blocks before it, so equal hashes mean equal prefixes. Freed
//! blocks keep their hash and stay findable until the block is handed out
//! again (oldest-freed first), so a repeated system prompt is computed once.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

pub type BlockId = u32;

pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// The prefix hash a block is registered under, while it is.
    hashes: Vec<Option<u64>>,
    cached: HashMap<u64, BlockId>,
    /// Free blocks as `(when freed, block)`: the first is reused first.
    free: BTreeSet<(u64, BlockId)>,
    freed_at: Vec<u64>,
    clock: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        BlockManager {
            block_size,
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            cached: HashMap::new(),
            free: (0..num_blocks as BlockId).map(|b| (0, b)).collect(),
            freed_at: vec![0; num_blocks],
            clock: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks no sequence holds (cached ones included: they are evictable).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks a sequence of `tokens` tokens occupies.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The hash of one full block of tokens following the block hashed `parent`.
    pub fn chain_hash(&self, parent: Option<u64>, block_tokens: &[u32]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        parent.hash(&mut h);
        block_tokens.hash(&mut h);
        h.finish()
    }

    /// The chained hashes of the full blocks of `tokens`.
    pub fn prefix_hashes(&self, tokens: &[u32]) -> Vec<u64> {
        let mut parent = None;
        tokens
            .chunks_exact(self.block_size)
            .map(|block| {
                let hash = self.chain_hash(parent, block);
                parent = Some(hash);
                hash
            })
            .collect()
    }

    /// Takes a reference to each cached block matching `hashes`, in order,
    /// stopping at the first miss. Returns the blocks (a prefix of the table).
    pub fn reuse_cached_prefix(&mut self, hashes: &[u64]) -> Vec<BlockId> {
        let mut blocks = Vec::new();
        for hash in hashes {
            let Some(&block) = self.cached.get(hash) else { break };
            if self.ref_counts[block as usize] == 0 {
                self.free.remove(&(self.freed_at[block as usize], block));
            }
            self.ref_counts[block as usize] += 1;
            blocks.push(block);
        }
        blocks
    }

    /// A fresh block for one sequence, evicting the oldest-freed cached block
    /// if need be; `None` when every block is in use.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let (_, block) = self.free.pop_first()?;
        if let Some(hash) = self.hashes[block as usize].take() {
            self.cached.remove(&hash);
        }
        self.ref_counts[block as usize] = 1;
        Some(block)
    }

    /// Registers a block whose tokens are all computed under its prefix hash,
    /// unless an equal block already is.
    pub fn register_full(&mut self, block: BlockId, hash: u64) {
        if self.hashes[block as usize].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.hashes[block as usize] = Some(hash);
        self.cached.insert(hash, block);
    }

    /// Drops one sequence's references; blocks nobody holds become free.
    /// Later blocks are freed first so that, evicted oldest-first, a prefix's
    /// tail goes before its head.
    pub fn free_table(&mut self, table: &[BlockId]) {
        for &block in table.iter().rev() {
            let count = &mut self.ref_counts[block as usize];
            assert!(*count > 0, "block {block} freed more often than allocated");
            *count -= 1;
            if *count == 0 {
                self.clock += 1;
                self.freed_at[block as usize] = self.clock;
                self.free.insert((self.clock, block));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_empty_then_free_returns_blocks() {
        let mut m = BlockManager::new(3, 4);
        let table: Vec<_> = (0..3).map(|_| m.allocate().unwrap()).collect();
        assert_eq!(m.allocate(), None);
        m.free_table(&table);
        assert_eq!(m.num_free(), 3);
    }

    #[test]
    fn a_registered_prefix_is_shared_and_survives_being_freed() {
        let mut m = BlockManager::new(4, 2);
        let tokens = [1, 2, 3, 4, 5];
        let hashes = m.prefix_hashes(&tokens);
        assert_eq!(hashes.len(), 2);
        let a: Vec<_> = (0..3).map(|_| m.allocate().unwrap()).collect();
        m.register_full(a[0], hashes[0]);
        m.register_full(a[1], hashes[1]);
        // A second sequence with the same first four tokens shares two blocks.
        let shared = m.reuse_cached_prefix(&hashes);
        assert_eq!(shared, a[..2]);
        m.free_table(&a);
        m.free_table(&shared);
        assert_eq!(m.num_free(), 4);
        // Still cached after both are gone.
        assert_eq!(m.reuse_cached_prefix(&hashes), a[..2]);
    }

    #[test]
    fn a_different_first_block_changes_every_later_hash() {
        let m = BlockManager::new(1, 2);
        let a = m.prefix_hashes(&[1, 2, 3, 4]);
        let b = m.prefix_hashes(&[9, 2, 3, 4]);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
    }

    #[test]
    fn eviction_takes_the_oldest_freed_and_forgets_its_hash() {
        let mut m = BlockManager::new(2, 1);
        let hashes = m.prefix_hashes(&[7, 8]);
        let table = vec![m.allocate().unwrap(), m.allocate().unwrap()];
        m.register_full(table[0], hashes[0]);
        m.register_full(table[1], hashes[1]);
        m.free_table(&table); // frees table[1] first, then table[0]
        let evicted = m.allocate().unwrap();
        assert_eq!(evicted, table[1]);
        assert_eq!(m.reuse_cached_prefix(&hashes), vec![table[0]]);
    }
}
