//! Chat templates from `tokenizer_config.json`, rendered with minijinja the
//! way Hugging Face's `apply_chat_template` renders them with jinja2:
//! `trim_blocks` and `lstrip_blocks` on, loop controls, Python string and dict
//! methods, HF's `tojson` (keys in insertion order, `", "`/`": "`
//! separators, non-ASCII and HTML characters left as they are),
//! `raise_exception(msg)` and `strftime_now(fmt)`.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// Everything a chat template can see besides the messages.
#[derive(Clone, Debug, Default)]
pub struct ChatContext {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the chat template does not parse: {0}")]
    Syntax(String),
    #[error("{0}")]
    Render(String),
}

pub struct ChatTemplate {
    env: Environment<'static>,
    context: ChatContext,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    pub fn new(source: String, context: ChatContext) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.expect("the default delimiters are valid"));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source)
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(ChatTemplate { env, context })
    }

    /// Renders `messages` (an array of OpenAI-style message objects) and,
    /// when given, `tools` (an array of tool definitions).
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template(NAME).expect("added in new()");
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            tools => tools.map(|t| Value::from(Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.context.bos_token.as_deref(),
            eos_token => self.context.eos_token.as_deref(),
        };
        template.render(ctx).map_err(|e| TemplateError::Render(describe(&e)))
    }
}

/// The error's own message (for `raise_exception`, the template author's words).
fn describe(e: &Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => e.to_string(),
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, which is
/// what HF's `tojson` calls.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(&spaces));
            json.serialize(&mut ser)
        }
        None => json.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter)),
    };
    written.map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(String::from_utf8(out).expect("serde_json writes UTF-8")))
}

/// serde_json's compact output with Python's default `", "` and `": "` separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: serde_json::Value) -> Result<String, TemplateError> {
        ChatTemplate::new(source.into(), ChatContext::default())?.render(&messages, None, false)
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let out = render("{{ messages[0] | tojson }}", json!([{"b": "é<>&", "a": [1, 2.5, null, true]}])).unwrap();
        assert_eq!(out, r#"{"b": "é<>&", "a": [1, 2.5, null, true]}"#);
        let out = render("{{ messages[0] | tojson(indent=2) }}", json!([{"k": [1]}])).unwrap();
        assert_eq!(out, "{\n  \"k\": [\n    1\n  ]\n}");
    }

    #[test]
    fn raise_exception_surfaces_the_template_message() {
        let err = render("{{ raise_exception('only user and assistant roles') }}", json!([])).unwrap_err();
        assert_eq!(err.to_string(), "only user and assistant roles");
    }

    #[test]
    fn python_string_methods_and_strftime_now_work() {
        let out = render(
            "{{ messages[0].content.strip().upper() }}|{{ strftime_now('%Y') | length }}",
            json!([{"content": "  hi "}]),
        );
        assert_eq!(out.unwrap(), "HI|4");
    }

    #[test]
    fn a_template_that_does_not_parse_is_a_syntax_error() {
        assert!(matches!(render("{% for x in %}", json!([])), Err(TemplateError::Syntax(_))));
    }
}
