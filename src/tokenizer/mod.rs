//! Text ↔ token ids for a model folder: `tokenizer.json` through the
//! `tokenizers` crate (special and added tokens included) and the chat
//! template from `tokenizer_config.json`.

mod chat_template;
mod detokenize;

pub use chat_template::{ChatContext, ChatTemplate, TemplateError};
pub use detokenize::DecodeStream;

use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("this model has no chat template (tokenizer_config.json has no chat_template); send a plain prompt instead")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(#[from] TemplateError),
    #[error("tokenizing failed: {0}")]
    Encode(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<ChatTemplate>,
    /// Ids dropped by `skip_special_tokens`.
    special_ids: HashSet<u32>,
    /// For byte-level vocabularies: each id's bytes, special ids empty.
    bytes: Option<TokenBytes>,
}

/// Every token's bytes in one buffer: id `i` is `bytes[ends[i-1]..ends[i]]`.
struct TokenBytes {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let load_err = |path: &Path, message: String| TokenizerError::Load {
            path: path.into(),
            message,
        };
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| load_err(&path, e.to_string()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match config_path.exists() {
            true => {
                let text = std::fs::read_to_string(&config_path).map_err(|e| load_err(&config_path, e.to_string()))?;
                serde_json::from_str(&text).map_err(|e| load_err(&config_path, e.to_string()))?
            }
            false => Value::Null,
        };
        let chat_template = template_source(&config)
            .map(|source| {
                let context = ChatContext {
                    bos_token: token_text(&config["bos_token"]),
                    eos_token: token_text(&config["eos_token"]),
                };
                ChatTemplate::new(source, context)
            })
            .transpose()
            .map_err(|e| load_err(&config_path, e.to_string()))?;
        let special_ids = special_ids(&inner, &config);
        let bytes = byte_level_table(&inner, &special_ids);
        Ok(Tokenizer {
            inner,
            chat_template,
            special_ids,
            bytes,
        })
    }

    /// Encodes text as given (no BOS added); special-token text such as
    /// `<|im_start|>` becomes its special token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text. Ids outside the vocabulary (the model's embedding
    /// is padded past it) decode to nothing, as in Hugging Face.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let kept: Vec<u32> = match skip_special_tokens {
            true => ids.iter().copied().filter(|id| !self.special_ids.contains(id)).collect(),
            false => ids.to_vec(),
        };
        // Byte-level decoding cannot fail for ids the vocabulary knows; unknown
        // ids are skipped by the library itself.
        self.inner.decode(&kept, false).unwrap_or_default()
    }

    /// The bytes a token decodes to (special tokens skipped: none), for
    /// byte-level vocabularies, where a token's text never depends on its
    /// neighbours; None for other decoders.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let table = self.bytes.as_ref()?;
        let id = id as usize;
        let Some(&end) = table.ends.get(id) else {
            return Some(&[]);
        };
        let start = if id == 0 { 0 } else { table.ends[id - 1] };
        Some(&table.bytes[start as usize..end as usize])
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders a conversation to the prompt text the model was trained on.
    pub fn apply_chat_template(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self.chat_template.as_ref().ok_or(TokenizerError::NoChatTemplate)?;
        Ok(template.render(messages, tools, add_generation_prompt)?)
    }
}

/// Added tokens flagged special: tokenizer.json's flags, overridden by
/// tokenizer_config.json's `added_tokens_decoder` as Hugging Face does (Qwen
/// marks `<tool_call>` special in one and not in the other, and keeps it in
/// decoded text).
fn special_ids(inner: &tokenizers::Tokenizer, config: &Value) -> HashSet<u32> {
    let mut special: HashSet<u32> = inner
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .collect();
    if let Some(overrides) = config["added_tokens_decoder"].as_object() {
        for (id, token) in overrides {
            let (Ok(id), Some(flag)) = (id.parse::<u32>(), token["special"].as_bool()) else {
                continue;
            };
            if flag {
                special.insert(id);
            } else {
                special.remove(&id);
            }
        }
    }
    special
}

/// Each id's bytes under the `ByteLevel` decoder, which maps every character
/// of a token through GPT-2's byte↔character table (a token with a character
/// outside it, such as an added token with a space, keeps its UTF-8 bytes).
fn byte_level_table(inner: &tokenizers::Tokenizer, special_ids: &HashSet<u32>) -> Option<TokenBytes> {
    if !matches!(inner.get_decoder(), Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_))) {
        return None;
    }
    let mut char_byte = std::collections::HashMap::new();
    let mut next_unprintable = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            b as u32
        } else {
            next_unprintable += 1;
            next_unprintable - 1
        };
        char_byte.insert(char::from_u32(c).expect("below U+0200"), b);
    }
    let mut table = TokenBytes {
        bytes: Vec::new(),
        ends: Vec::new(),
    };
    for id in 0..inner.get_vocab_size(true) as u32 {
        if let Some(token) = inner.id_to_token(id).filter(|_| !special_ids.contains(&id)) {
            match token.chars().map(|c| char_byte.get(&c).copied()).collect::<Option<Vec<u8>>>() {
                Some(mapped) => table.bytes.extend(mapped),
                None => table.bytes.extend(token.as_bytes()),
            }
        }
        table.ends.push(table.bytes.len() as u32);
    }
    Some(table)
}

/// `chat_template` is a string, or a list of `{name, template}` of which HF
/// uses the one named "default".
fn template_source(config: &Value) -> Option<String> {
    match &config["chat_template"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(value: &Value) -> Option<String> {
    value.as_str().or_else(|| value["content"].as_str()).map(str::to_string)
}
