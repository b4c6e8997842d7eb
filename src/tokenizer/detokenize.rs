//! Incremental detokenization: text is emitted as tokens arrive, and a
//! character whose UTF-8 bytes are split across several byte-level tokens is
//! emitted once, whole, when its last byte arrives.
//!
//! Byte-level vocabularies (Qwen2, GPT-2, Llama 3) take the fast path: each
//! token is a fixed byte string, so the stream appends bytes and releases
//! every complete character, as `from_utf8_lossy` of the whole would read.
//! Other decoders can make a token's text depend on its neighbours, so each
//! step decodes a short window (from `prefix_offset`) with and without the
//! new tokens and emits only the difference once it no longer ends in a
//! replacement character.

use super::Tokenizer;

pub struct DecodeStream {
    mode: Mode,
}

enum Mode {
    /// Bytes not yet released: the start of an unfinished character.
    Bytes(Vec<u8>),
    Window {
        ids: Vec<u32>,
        /// Start of the window decoded for context.
        prefix_offset: usize,
        /// Tokens before this have had their text emitted.
        read_offset: usize,
    },
}

impl DecodeStream {
    /// `prompt_ids` give the first token context (its leading space, for
    /// instance); their own text is never emitted. A prompt that ends inside
    /// a character gives no context, so the completion streams exactly as
    /// its own full decode reads, instead of never matching it.
    pub fn new(tokenizer: &Tokenizer, prompt_ids: &[u32]) -> Self {
        if tokenizer.token_bytes(0).is_some() {
            return DecodeStream {
                mode: Mode::Bytes(Vec::new()),
            };
        }
        // A few prompt tokens are enough context for any merge boundary.
        let mut tail = &prompt_ids[prompt_ids.len().saturating_sub(6)..];
        if tokenizer.decode(tail, true).ends_with('\u{FFFD}') {
            tail = &[];
        }
        DecodeStream {
            mode: Mode::Window {
                ids: tail.to_vec(),
                prefix_offset: 0,
                read_offset: tail.len(),
            },
        }
    }

    /// Adds one token and returns the text it completes, if any.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        match &mut self.mode {
            Mode::Bytes(pending) => {
                pending.extend_from_slice(tokenizer.token_bytes(id).unwrap_or_default());
                release(pending, false)
            }
            Mode::Window { ids, .. } => {
                ids.push(id);
                self.window_text(tokenizer, false)
            }
        }
    }

    /// The text still held back at the end of generation (an unfinished
    /// character decodes as U+FFFD, as a full decode would show it).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        match &mut self.mode {
            Mode::Bytes(pending) => release(pending, true),
            Mode::Window { .. } => self.window_text(tokenizer, true),
        }
    }

    fn window_text(&mut self, tokenizer: &Tokenizer, finish: bool) -> String {
        let Mode::Window {
            ids,
            prefix_offset,
            read_offset,
        } = &mut self.mode
        else {
            unreachable!("window_text is only called in window mode")
        };
        let prefix = tokenizer.decode(&ids[*prefix_offset..*read_offset], true);
        let full = tokenizer.decode(&ids[*prefix_offset..], true);
        if !finish && (full.ends_with('\u{FFFD}') || full.len() <= prefix.len() || !full.starts_with(&prefix)) {
            return String::new();
        }
        *prefix_offset = *read_offset;
        *read_offset = ids.len();
        full.strip_prefix(&prefix).unwrap_or_default().to_string()
    }
}

/// Takes the complete characters from the front of `pending` (an invalid
/// sequence becomes U+FFFD, as `from_utf8_lossy` has it); an unfinished
/// character at the end stays unless `finish`.
fn release(pending: &mut Vec<u8>, finish: bool) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = pending;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(text) => {
                out.push_str(text);
                rest = &[];
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).expect("checked valid"));
                match e.error_len() {
                    Some(bad) => rest = &after[bad..],
                    None if finish => rest = &[],
                    None => {
                        rest = after;
                        break;
                    }
                }
                out.push('\u{FFFD}');
            }
        }
    }
    let kept = rest.len();
    pending.drain(..pending.len() - kept);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level vocabulary with a Metaspace decoder: the first word of a
    /// text loses its leading space, so a token's text depends on context.
    fn metaspace_tokenizer() -> Tokenizer {
        let dir = std::env::temp_dir().join(format!("shardline-metaspace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
            "model": {"type": "WordLevel", "vocab": {"▁Hello": 0, "▁world": 1, "!": 2, "<unk>": 3}, "unk_token": "<unk>"}
        });
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        tokenizer
    }

    #[test]
    fn other_decoders_stream_through_a_context_window() {
        let t = metaspace_tokenizer();
        assert!(t.token_bytes(0).is_none());
        let ids = [0, 1, 2, 1];
        let mut stream = DecodeStream::new(&t, &[]);
        let mut text: String = ids.iter().map(|&id| stream.step(&t, id)).collect();
        text += &stream.finish(&t);
        assert_eq!(text, t.decode(&ids, true));
        assert_eq!(text, "Hello world! world");
        // After a prompt, the first word keeps its space.
        let mut stream = DecodeStream::new(&t, &[0]);
        assert_eq!(stream.step(&t, 1), " world");
    }

    #[test]
    fn bytes_release_whole_characters_and_replace_invalid_ones() {
        let mut pending = vec![b'a', 0xE2, 0x82];
        assert_eq!(release(&mut pending, false), "a");
        pending.push(0xAC);
        assert_eq!(release(&mut pending, false), "€");
        pending.extend([0xE2, b'x', 0xF0]);
        assert_eq!(release(&mut pending, false), "\u{FFFD}x");
        assert_eq!(release(&mut pending, true), "\u{FFFD}");
        assert!(pending.is_empty());
    }
}
