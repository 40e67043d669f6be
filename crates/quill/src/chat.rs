//! Chat templates: a model's own Jinja `chat_template` (from tokenizer_config.json or
//! chat_template.jinja) rendered with `minijinja`, configured as `transformers` configures
//! Jinja for `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, Python string
//! and dict methods, `raise_exception`, `strftime_now`), with the tokenizer's special tokens
//! (bos_token, eos_token, ...) in the context.

use crate::{Error, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct ChatTemplate {
    source: String,
    /// Special-token strings passed to the template (bos_token, eos_token, ...).
    special: serde_json::Map<String, Value>,
    /// Steps the template may take per rendering ([`TEMPLATE_FUEL`] unless set).
    fuel: u64,
}

/// The text of a special-token entry: a string, or an AddedToken object with "content".
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// The special tokens named in a folder's tokenizer_config.json (bos_token, eos_token,
/// unk_token, pad_token as strings; additional_special_tokens as a list); empty without one.
pub fn special_tokens(dir: &Path) -> Result<serde_json::Map<String, Value>> {
    let cfg_path = dir.join("tokenizer_config.json");
    let mut out = serde_json::Map::new();
    if !cfg_path.is_file() {
        return Ok(out);
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(s) = cfg.get(key).and_then(token_text) {
            out.insert(key.into(), Value::String(s));
        }
    }
    if let Some(Value::Array(a)) = cfg.get("additional_special_tokens") {
        let list: Vec<Value> = a.iter().filter_map(token_text).map(Value::String).collect();
        out.insert("additional_special_tokens".into(), Value::Array(list));
    }
    Ok(out)
}

impl ChatTemplate {
    pub fn new(source: &str) -> Self {
        ChatTemplate {
            source: source.into(),
            special: serde_json::Map::new(),
            fuel: TEMPLATE_FUEL,
        }
    }

    /// The same template with another step limit per rendering (the fuzz target uses a
    /// smaller one, so that runaway templates cost it less time).
    pub fn with_fuel(mut self, steps: u64) -> Self {
        self.fuel = steps;
        self
    }

    /// A template with the special-token strings it is given (bos_token, eos_token, ...);
    /// an error when it does not parse.
    pub fn with_special(source: &str, special: serde_json::Map<String, Value>) -> Result<Self> {
        let mut t = ChatTemplate::new(source);
        t.special = special;
        t.env()?;
        Ok(t)
    }

    /// The chat template of a model folder: `chat_template.jinja`, or `chat_template` in
    /// tokenizer_config.json (a string, or a list of named templates, of which "default").
    /// Ok(None) when the folder has none.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?
        } else {
            Value::Null
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?)
        } else {
            match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(String::from),
                _ => None,
            }
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let mut t = ChatTemplate::new(&source);
        t.special = special_tokens(dir)?;
        // fails early on a template that does not parse
        t.env()
            .map_err(|e| Error::format(dir.join("tokenizer_config.json"), e.to_string()))?;
        Ok(Some(t))
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special-token string `key` (e.g. "eos_token") given to the template.
    pub fn special_token(&self, key: &str) -> Option<&str> {
        self.special.get(key).and_then(Value::as_str)
    }

    fn env(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| {
            // no time-zone database needed: the templates ask for dates like "26 Nov 2026"
            format_now(&fmt)
        });
        env.add_filter("tojson", tojson);
        // a template is code from a file: its steps are counted and its output capped
        env.set_fuel(Some(self.fuel));
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Input(format!("the chat template does not parse: {e}")))?;
        Ok(env)
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.env()?;
        let tmpl = env.get_template("chat").expect("added above");
        let mut ctx = self.special.clone();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).expect("messages serialize"),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::Null);
        ctx.insert("documents".into(), Value::Null);
        let ctx = minijinja::Value::from(minijinja::value::Serde(&ctx));
        let mut out = Capped(Vec::new());
        let rendered = tmpl.render_captured_to(ctx, &mut out).map(drop);
        match rendered {
            Ok(()) => String::from_utf8(out.0)
                .map_err(|_| Error::Input("the chat template wrote invalid UTF-8".into())),
            Err(_) if out.0.len() > TEMPLATE_OUTPUT => Err(Error::Input(format!(
                "the chat template wrote more than {TEMPLATE_OUTPUT} bytes; stopped"
            ))),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(Error::Input(format!(
                "the chat template ran more than {} steps; stopped",
                self.fuel
            ))),
            Err(e) => Err(Error::Input(format!(
                "the chat template failed to render: {e}"
            ))),
        }
    }
}

/// Steps a chat template may take (a conversation of a thousand messages takes well under a
/// tenth of this).
pub const TEMPLATE_FUEL: u64 = 2_000_000;
/// Bytes a chat template may write.
pub const TEMPLATE_OUTPUT: usize = 16 << 20;

/// A buffer that refuses to grow past [`TEMPLATE_OUTPUT`] (one byte past it, to tell).
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > TEMPLATE_OUTPUT {
            self.0.resize(TEMPLATE_OUTPUT + 1, 0);
            return Err(std::io::Error::other("template output cap"));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Jinja's `tojson` as `transformers` defines it: JSON without ASCII escaping, with an
/// optional indent.
fn tojson(
    v: minijinja::Value,
    indent: Option<usize>,
) -> std::result::Result<String, minijinja::Error> {
    let json = <Value as serde::Deserialize>::deserialize(v).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    Ok(match indent {
        Some(n) => {
            let mut buf = Vec::new();
            let ind = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&ind);
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            json.serialize(&mut ser).expect("serializes");
            String::from_utf8(buf).expect("utf-8")
        }
        None => {
            // Python's json.dumps separators: ", " and ": "
            python_json(&json)
        }
    })
}

fn python_json(v: &Value) -> String {
    match v {
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(python_json).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), python_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// The current UTC date/time in a strftime format (the directives chat templates use).
fn format_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out += &format!("{d:02}"),
            Some('m') => out += &format!("{m:02}"),
            Some('Y') => out += &y.to_string(),
            Some('y') => out += &format!("{:02}", y % 100),
            Some('b') => out += &month[..3],
            Some('B') => out += month,
            Some('H') => out += &format!("{:02}", sod / 3600),
            Some('M') => out += &format!("{:02}", sod / 60 % 60),
            Some('S') => out += &format!("{:02}", sod % 60),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_and_reports_template_errors() {
        let t = ChatTemplate::new(CHATML);
        let msgs = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let strict = ChatTemplate::new(
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok",
        );
        let e = strict.render(&msgs, true).unwrap_err().to_string();
        assert!(e.contains("System role not supported"), "{e}");
        assert!(strict.render(&msgs[1..], true).unwrap() == "ok");
        let e = ChatTemplate::new("{% for %}")
            .render(&msgs, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not parse"), "{e}");
        // Python string methods, as HF templates use them
        let py = ChatTemplate::new("{{ messages[0]['content'].strip().upper() }}");
        assert_eq!(
            py.render(&[Message::new("user", "  x ")], false).unwrap(),
            "X"
        );
        assert_eq!(format_now("%Y").len(), 4);
    }

    #[test]
    fn a_template_stops_at_its_step_limit() {
        // 50 × 50 loop iterations, each a few steps: well under the served limit
        let looping = "{% for i in range(50) %}{% for j in range(50) %}.{% endfor %}{% endfor %}";
        let msgs = [Message::new("user", "Hi")];
        assert_eq!(
            ChatTemplate::new(looping)
                .render(&msgs, true)
                .unwrap()
                .len(),
            2500
        );
        let e = ChatTemplate::new(looping)
            .with_fuel(1000)
            .render(&msgs, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 1000 steps"), "{e}");
    }
}
