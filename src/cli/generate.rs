//! `shardline generate`: one prompt (text, a chat message, or token ids),
//! streamed to stdout as it is produced, with time to first token and decode
//! speed at the end; or one JSON object with `--json`.

use super::sampling_args::SamplingArgs;
use super::{follow, start_executor, ModelArgs, ParallelArgs};
use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use shardline::config::GenerationConfig;
use shardline::generation::{blocks_for, GenerateRequest, Generation, Generator};
use shardline::model_dir::{self, ModelInfo};
use shardline::sampling::SamplingParams;
use shardline::tokenizer::{DecodeStream, Tokenizer};
use std::io::Write;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    parallel: ParallelArgs,
    /// The prompt text (sent as is, or as a user message with --chat).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Render --prompt through the model's chat template as a user message.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// A system message for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// The prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256, env = "SHARDLINE_MAX_TOKENS")]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Seeds sampling (and dummy weights).
    #[arg(long, default_value_t = 0, env = "SHARDLINE_SEED")]
    seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Also report the K most likely tokens at each step (with --json).
    #[arg(long, value_name = "K")]
    logprobs: Option<usize>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

impl GenerateArgs {
    fn sampling(&self, defaults: &GenerationConfig) -> anyhow::Result<SamplingParams> {
        Ok(SamplingParams {
            logprobs: self.logprobs,
            ..self.sampling.params(defaults, self.seed)?
        })
    }

    fn prompt_ids(&self, tokenizer: Option<&Tokenizer>) -> anyhow::Result<Vec<u32>> {
        if let Some(ids) = &self.prompt_ids {
            return Ok(ids.clone());
        }
        let text = self.prompt.as_deref().unwrap_or_default();
        let Some(tokenizer) = tokenizer else {
            bail!("this model folder has no tokenizer.json, so it takes --prompt-ids, not --prompt");
        };
        let text = match self.chat {
            false => text.to_string(),
            true => {
                let mut messages = Vec::new();
                if let Some(system) = &self.system {
                    messages.push(json!({"role": "system", "content": system}));
                }
                messages.push(json!({"role": "user", "content": text}));
                tokenizer.apply_chat_template(&json!(messages), None, true)?
            }
        };
        Ok(tokenizer.encode(&text)?)
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.parallel.follower() {
        return follow(&args.model.options(args.seed), &args.parallel);
    }
    let options = args.model.options(args.seed);
    let ModelInfo {
        config,
        tokenizer,
        generation,
        eos_token_ids,
        ..
    } = model_dir::describe(&options).context("loading the model")?;
    let request = GenerateRequest {
        prompt_ids: args.prompt_ids(tokenizer.as_ref())?,
        max_tokens: args.max_tokens,
        sampling: args.sampling(&generation)?,
        eos_token_ids,
        ignore_eos: args.ignore_eos,
    };
    let num_blocks = blocks_for(request.prompt_ids.len() + request.max_tokens);
    let (executor, _) = start_executor(&options, &config, &args.parallel, num_blocks)?;
    let mut generator = Generator::with_executor(executor, num_blocks);
    let mut stream = tokenizer.as_ref().map(|t| DecodeStream::new(t, &request.prompt_ids));
    let mut stdout = std::io::stdout().lock();
    let out = generator.generate(&request, |token| {
        if args.json {
            return;
        }
        let piece = match (&tokenizer, &mut stream) {
            (Some(t), Some(stream)) => stream.step(t, token.token_id),
            _ => format!("{} ", token.token_id),
        };
        // A closed stdout (piped into `head`) must not stop generation midway.
        let _ = write!(stdout, "{piece}").and_then(|_| stdout.flush());
    })?;
    if args.json {
        let report = json_report(&request, &out, tokenizer.as_ref());
        writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
        return Ok(());
    }
    let rest = match (&tokenizer, &mut stream) {
        (Some(t), Some(stream)) => stream.finish(t),
        _ => String::new(),
    };
    writeln!(stdout, "{rest}")?;
    eprintln!(
        "[{} prompt tokens, {} generated, finish: {:?}] time to first token {:.1} ms, decode {:.2} tokens/s",
        request.prompt_ids.len(),
        out.tokens.len(),
        out.finish_reason,
        out.time_to_first_token.as_secs_f64() * 1e3,
        out.decode_tokens_per_second()
    );
    Ok(())
}

fn json_report(request: &GenerateRequest, out: &Generation, tokenizer: Option<&Tokenizer>) -> serde_json::Value {
    let completion_ids = out.completion_ids();
    let logprobs = request.sampling.logprobs.map(|_| {
        out.tokens
            .iter()
            .filter_map(|t| {
                t.logprobs
                    .as_ref()
                    .map(|l| json!({"token_id": t.token_id, "logprob": l.logprob, "top_logprobs": l.top}))
            })
            .collect::<Vec<_>>()
    });
    json!({
        "prompt_ids": request.prompt_ids,
        "completion_ids": completion_ids,
        "text": tokenizer.map(|t| t.decode(&completion_ids, true)),
        "finish_reason": out.finish_reason,
        "logprobs": logprobs,
        "timings": {
            "time_to_first_token_ms": out.time_to_first_token.as_secs_f64() * 1e3,
            "total_ms": out.total_time.as_secs_f64() * 1e3,
            "decode_tokens_per_second": out.decode_tokens_per_second(),
        },
    })
}
