//! Incremental detokenization: text is emitted as tokens arrive, and a
//! character whose UTF-8 bytes are split across several byte-level tokens is
//! emitted once, whole, when its last byte arrives.
//!
//! Byte-level BPE decodes a lone fragment of a multi-byte character as U+FFFD,
//! and a token's text can depend on its neighbours, so each step decodes a
//! short window (from `prefix_offset`) with and without the new tokens and
//! emits only the difference once it no longer ends in a replacement char.

use super::Tokenizer;

pub struct DecodeStream {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// Tokens before this have had their text emitted.
    read_offset: usize,
}

impl DecodeStream {
    /// `prompt_ids` give the first token context (its leading space, for
    /// instance); their own text is never emitted. A prompt that ends inside
    /// a character gives no context, so the completion streams exactly as
    /// its own full decode reads, instead of never matching it.
    pub fn new(tokenizer: &Tokenizer, prompt_ids: &[u32]) -> Self {
        // A few prompt tokens are enough context for any merge boundary.
        let mut tail = &prompt_ids[prompt_ids.len().saturating_sub(6)..];
        if tokenizer.decode(tail, true).ends_with('\u{FFFD}') {
            tail = &[];
        }
        DecodeStream {
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
        }
    }

    /// Adds one token and returns the text it completes, if any.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true);
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true);
        if full.ends_with('\u{FFFD}') || full.len() <= prefix.len() || !full.starts_with(&prefix) {
            return String::new();
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        full[prefix.len()..].to_string()
    }

    /// The text still held back at the end of generation (an unfinished
    /// character decodes as U+FFFD, as a full decode would show it).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true);
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        full.strip_prefix(&prefix).unwrap_or_default().to_string()
    }
}
