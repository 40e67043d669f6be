//! `quill serve`: an OpenAI-compatible HTTP API (axum + tokio) over a quill model.
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (the model's chat template applied), each streamed as
//! server-sent events (ending `data: [DONE]`) or not. The web page at `/` reads
//! `POST /v1/quill/{explain,cut,attention}`. Errors use OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`. The numerics run on one engine thread
//! (see [`engine`]); handlers only parse, tokenize and relay.

pub mod engine;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::{Event, Handle, Job, Shared, SubmitError, TokenInfo};
use quill::chat::{ChatTemplate, Message};
use quill::sample::SamplingParams;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Largest request body accepted (bytes).
pub const MAX_BODY: usize = 4 << 20;
/// The most tokens `/v1/quill/attention` draws a map for (a map of T × T numbers).
pub const MAX_ATTENTION_TOKENS: usize = 1024;
static ATTENTION_TURN: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

pub struct Options {
    /// A model folder, or a llama2.c checkpoint file (with `tokenizer`).
    pub model_dir: std::path::PathBuf,
    /// A llama2.c checkpoint's tokenizer.bin.
    pub tokenizer: Option<std::path::PathBuf>,
    /// A LoRA adapter folder (PEFT's format): merged into the weights, or run beside a
    /// quantized base unmerged.
    pub adapter: Option<std::path::PathBuf>,
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// Host names accepted besides the loopback ones when bound to a loopback address.
    pub allow_hosts: Vec<String>,
    /// Seconds a client has to send a request's headers, and its body.
    pub header_seconds: u64,
    pub body_seconds: u64,
    pub threads: Option<usize>,
    /// Requests that may wait for a turn before new ones get 429.
    pub queue: usize,
    /// Requests decoded together at most.
    pub max_active: usize,
}

pub struct Served {
    pub shared: Arc<Shared>,
    pub template: Option<ChatTemplate>,
    pub model_id: String,
    pub gen: quill::io::hf::GenerationConfig,
}

struct AppState {
    served: Served,
    handle: Handle,
    api_key: Option<String>,
    body_seconds: u64,
    created: u64,
    counter: AtomicU64,
}

type App = Arc<AppState>;

/// An OpenAI-format error response.
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(String::from),
            code: None,
        }
    }
    fn with(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        ApiError {
            status,
            message,
            kind,
            param: None,
            code: Some(code),
        }
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Builds the router (public for tests that drive it without a socket).
fn router(app: App) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/quill/info", get(info))
        .route("/v1/quill/explain", post(explain))
        .route("/v1/quill/attention", post(attention))
        .route("/v1/quill/cut", post(cut))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(|| async {
            ApiError::with(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown_url",
                "no such endpoint (try /v1/completions, /v1/chat/completions, /v1/models)".into(),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(app)
}

/// Opens the model folder (or llama2.c checkpoint and its tokenizer) for serving.
pub fn open(
    dir: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    adapter: Option<&std::path::Path>,
) -> Result<Served, String> {
    let o = quill::io::open_adapted(dir, tokenizer, adapter).map_err(|e| e.to_string())?;
    let model_id = std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| "model".into());
    Ok(Served {
        shared: Arc::new(Shared {
            model: o.model,
            tok: o.tok,
            eos: o.eos,
        }),
        template: o.template,
        model_id,
        gen: o.gen,
    })
}

/// Large buffers (an attention map's JSON is megabytes) are given back to the system when
/// freed. glibc otherwise raises its mmap threshold after each such free, and later buffers
/// of that size come from per-thread heaps that keep their memory: a server's resident size
/// would then wander upward by tens of megabytes with the request mix.
fn return_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before the server's
    // threads start, and a refusal (return 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Serves until the process is stopped. `on_ready` gets the bound address.
pub fn run(opts: Options, on_ready: impl FnOnce(std::net::SocketAddr)) -> Result<(), String> {
    return_large_buffers();
    let served = open(
        &opts.model_dir,
        opts.tokenizer.as_deref(),
        opts.adapter.as_deref(),
    )?;
    let handle = engine::spawn(
        served.shared.clone(),
        opts.threads,
        opts.queue.max(1),
        opts.max_active,
    );
    let app = Arc::new(AppState {
        served,
        handle,
        api_key: opts.api_key,
        body_seconds: opts.body_seconds.max(1),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        counter: AtomicU64::new(0),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = listen(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        on_ready(local);
        let hosts = HostRule {
            loopback: local.ip().is_loopback(),
            allowed: opts
                .allow_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        };
        let routes = router(app).layer(axum::middleware::from_fn_with_state(
            Arc::new(hosts),
            check_host,
        ));
        accept_loop(listener, routes, opts.header_seconds.max(1)).await
    })
}

/// Connections the kernel may hold for us before we accept them. Tokio's default (1024) is
/// smaller than a burst of connections from many clients; when the queue is full the kernel
/// drops the next SYN and that client waits a full second to retry. Linux caps it at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the first address `addr` resolves to that accepts a listener, with [`LISTEN_BACKLOG`].
async fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    }))
}

/// Connections served at once; beyond it new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 2048;
/// Seconds a client has by default to send a request's headers (a connection that trickles
/// them in, or sits idle between requests, is closed).
pub const HEADER_SECONDS: u64 = 10;
/// Seconds a client has by default to send a request's body (then 408).
pub const BODY_SECONDS: u64 = 30;

/// Accepts connections until Ctrl-C: at most [`MAX_CONNECTIONS`] at once, each an HTTP/1.1
/// connection whose headers must arrive within `header_seconds`.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    routes: Router,
    header_seconds: u64,
) -> Result<(), String> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                // out of file descriptors and the like: wait a moment rather than spin
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(routes.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(header_seconds));
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = http.serve_connection(io, service).with_upgrades().await;
            drop(slot);
        });
    }
}

/// Which Host headers a server answers.
struct HostRule {
    /// Bound to a loopback address: only local names (and `allowed`) are answered.
    loopback: bool,
    allowed: Vec<String>,
}

impl HostRule {
    fn accepts(&self, host: Option<&str>) -> bool {
        if !self.loopback {
            return true;
        }
        let Some(host) = host else { return false };
        let host = host.to_ascii_lowercase();
        // the name without its port ([::1]:8080 keeps its brackets)
        let name = match host.rsplit_once(':') {
            Some((n, port))
                if !n.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit())
                    && !n.ends_with(':') =>
            {
                n
            }
            _ => host.as_str(),
        };
        ["localhost", "127.0.0.1", "[::1]"].contains(&name)
            || self.allowed.iter().any(|a| a == name)
    }
}

/// Refuses requests for other host names when bound to a loopback address: a page on a
/// domain that resolves to 127.0.0.1 (DNS rebinding) sends its own name as Host.
async fn check_host(
    State(rule): State<Arc<HostRule>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if rule.accepts(host) {
        return next.run(req).await;
    }
    ApiError::with(
        StatusCode::FORBIDDEN,
        "invalid_request_error",
        "host_not_allowed",
        format!(
            "this server answers requests for localhost, 127.0.0.1 and [::1]; start it with --allow-host {} to answer this name",
            host.unwrap_or("NAME").split(':').next().unwrap_or("NAME")
        ),
    )
    .into_response()
}

fn check_auth(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::with(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or wrong API key (send Authorization: Bearer KEY)".into(),
        ))
    }
}

/// Whether two secrets are equal, in a time that does not depend on where they differ (a
/// comparison that stops at the first difference tells an attacker how much was right).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..n {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    std::hint::black_box(diff) == 0
}

async fn models(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    check_auth(&app, &headers)?;
    Ok(Json(json!({"object": "list", "data": [{
        "id": app.served.model_id, "object": "model", "created": app.created, "owned_by": "quill"
    }]})))
}

/// The request's JSON object. A body declared as anything but JSON is refused (415) before
/// it is read: a browser sends `text/plain` or form bodies to another site without asking
/// first, so a page elsewhere cannot start work here. A missing Content-Type is taken as JSON.
async fn read_json(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Map<String, Value>, ApiError> {
    if let Some(ct) = headers.get(axum::http::header::CONTENT_TYPE) {
        let media = ct
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim();
        if !media.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::with(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
                format!("the body must be JSON (Content-Type: application/json), not {media:?}"),
            ));
        }
    }
    let read = axum::body::to_bytes(body, MAX_BODY);
    let secs = app.body_seconds;
    let read = tokio::time::timeout(std::time::Duration::from_secs(secs), read)
        .await
        .map_err(|_| {
            ApiError::with(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request_timeout",
                format!("the request body did not arrive within {secs} s"),
            )
        })?;
    let bytes: Bytes = read.map_err(|e| {
        // the length limit, or a client that broke off or stalled mid-body
        let mut cause: Option<&dyn std::error::Error> = Some(&e);
        let mut too_large = false;
        while let Some(c) = cause {
            too_large |= c.to_string().contains("length limit exceeded");
            cause = c.source();
        }
        match too_large {
            true => ApiError::with(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                format!("the request body is larger than {MAX_BODY} bytes"),
            ),
            false => ApiError::bad(format!("the request body could not be read: {e}"), None),
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}"), None))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad("the body must be a JSON object", None)),
    }
}

/// Typed access to request fields, each mistake a 400 naming the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn f32_in(&self, k: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x >= lo && x <= hi => Ok(Some(x as f32)),
                Some(x) => Err(ApiError::bad(
                    format!("{k} must be between {lo} and {hi} (got {x})"),
                    Some(k),
                )),
                None => Err(ApiError::bad(format!("{k} must be a number"), Some(k))),
            },
        }
    }
    fn int(&self, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(x) if x >= lo && x <= hi => Ok(Some(x)),
                Some(x) => Err(ApiError::bad(
                    format!("{k} must be between {lo} and {hi} (got {x})"),
                    Some(k),
                )),
                None => Err(ApiError::bad(format!("{k} must be an integer"), Some(k))),
            },
        }
    }
    fn bool(&self, k: &str) -> Result<bool, ApiError> {
        match self.get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::bad(format!("{k} must be true or false"), Some(k))),
        }
    }
}

/// What both endpoints share, parsed from the body.
struct Common {
    stream: bool,
    include_usage: bool,
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
}

fn parse_common(app: &AppState, m: &Map<String, Value>) -> Result<Common, ApiError> {
    let f = Fields(m);
    if let Some(model) = f.get("model") {
        let Some(name) = model.as_str() else {
            return Err(ApiError::bad("model must be a string", Some("model")));
        };
        if name != app.served.model_id {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model `{name}` does not exist; this server has `{}`",
                    app.served.model_id
                ),
                kind: "invalid_request_error",
                param: Some("model".into()),
                code: Some("model_not_found"),
            });
        }
    }
    if let Some(n) = f.int("n", 1, i64::MAX)? {
        if n != 1 {
            return Err(ApiError::bad("only n = 1 is supported", Some("n")));
        }
    }
    let max_tokens = match f.int("max_completion_tokens", 0, i64::MAX)? {
        Some(x) => Some(x),
        None => f.int("max_tokens", 0, i64::MAX)?,
    }
    .map(|x| x as usize);
    let gen = &app.served.gen;
    let greedy = gen.do_sample == Some(false);
    let temperature = f.f32_in("temperature", 0.0, 2.0)?.unwrap_or(if greedy {
        0.0
    } else {
        gen.temperature.unwrap_or(1.0)
    });
    let top_p = match f.get("top_p") {
        Some(_) => {
            let p = f.f32_in("top_p", 0.0, 1.0)?.unwrap_or(1.0);
            if p <= 0.0 {
                return Err(ApiError::bad("top_p must be in (0, 1]", Some("top_p")));
            }
            p
        }
        None => gen.top_p.unwrap_or(1.0),
    };
    let top_k = f
        .int("top_k", 0, i64::MAX)?
        .map(|k| k as usize)
        .unwrap_or(gen.top_k.unwrap_or(0));
    let seed = match f.get("seed") {
        None => app.counter.load(Ordering::Relaxed) ^ 0x5eed,
        Some(v) => v
            .as_i64()
            .map(|x| x as u64)
            .or(v.as_u64())
            .ok_or_else(|| ApiError::bad("seed must be an integer", Some("seed")))?,
    };
    let repetition_penalty = f
        .f32_in("repetition_penalty", 0.01, 100.0)?
        .unwrap_or(gen.repetition_penalty.unwrap_or(1.0));
    let presence_penalty = f.f32_in("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let frequency_penalty = f.f32_in("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let min_p = f
        .f32_in("min_p", 0.0, 1.0)?
        .unwrap_or(gen.min_p.unwrap_or(0.0));
    let stop = match f.get("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let v: Option<Vec<String>> = a.iter().map(|x| x.as_str().map(String::from)).collect();
            let v = v.ok_or_else(|| {
                ApiError::bad("stop must be a string or a list of strings", Some("stop"))
            })?;
            if v.len() > 4 {
                return Err(ApiError::bad("stop takes at most 4 strings", Some("stop")));
            }
            v
        }
        Some(_) => {
            return Err(ApiError::bad(
                "stop must be a string or a list of strings",
                Some("stop"),
            ))
        }
    };
    let stream = f.bool("stream")?;
    let include_usage = f
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Common {
        stream,
        include_usage,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            vocab_limit: app.served.shared.tok.vocab_size(),
            seed,
        },
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
    })
}

fn submit(
    app: &AppState,
    prompt: Vec<u32>,
    c: &Common,
    default_max: usize,
    logprobs: Option<usize>,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, ApiError> {
    let ctx = app.served.shared.model.context();
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty", Some("prompt")));
    }
    if prompt.len() >= ctx {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "the prompt has {} tokens; this model's context is {ctx} tokens, which leaves no room for a reply",
                prompt.len()
            ),
            kind: "invalid_request_error",
            param: Some("messages".into()),
            code: Some("context_length_exceeded"),
        });
    }
    let room = ctx - prompt.len();
    let max_tokens = match c.max_tokens {
        Some(0) => {
            return Err(ApiError::bad(
                "max_tokens must be at least 1",
                Some("max_tokens"),
            ))
        }
        Some(m) if m > room => {
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "the prompt ({} tokens) plus max_tokens ({m}) exceed this model's context of {ctx} tokens",
                    prompt.len()
                ),
                kind: "invalid_request_error",
                param: Some("max_tokens".into()),
                code: Some("context_length_exceeded"),
            })
        }
        Some(m) => m,
        None => default_max.min(room),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        id: format!("request {}", app.counter.fetch_add(1, Ordering::Relaxed)),
        prompt,
        max_tokens,
        sampling: c.sampling.clone(),
        stop: c.stop.clone(),
        logprobs,
        events: tx,
    };
    app.handle.submit(job).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::with(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "queue_full",
            "the server is busy (its request queue is full); retry shortly".into(),
        ),
        SubmitError::Stopped => ApiError::with(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "engine_stopped",
            "the model engine has stopped".into(),
        ),
    })?;
    Ok(rx)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Collects a whole reply: (text, tokens, finish reason, prompt tokens, completion tokens).
async fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Result<(String, Vec<TokenInfo>, &'static str, usize, usize), ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text {
                text: t,
                tokens: tk,
            } => {
                text.push_str(&t);
                tokens.extend(tk);
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok((
                    text,
                    tokens,
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                ))
            }
            Event::Error(e) => {
                return Err(ApiError::with(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "generation_failed",
                    e,
                ))
            }
        }
    }
    Err(ApiError::with(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "generation_failed",
        "the engine ended the request".into(),
    ))
}

fn usage(p: usize, c: usize) -> Value {
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

fn completion_logprobs(tokens: &[TokenInfo], with_top: bool) -> Value {
    let mut offset = 0;
    let mut offsets = Vec::new();
    for t in tokens {
        offsets.push(offset);
        offset += t.text.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": if with_top {
            Value::Array(tokens.iter().map(|t| {
                let m: Map<String, Value> = t.top.iter().map(|(s, l)| (s.clone(), json!(l))).collect();
                Value::Object(m)
            }).collect())
        } else { Value::Null },
        "text_offset": offsets,
    })
}

fn chat_logprobs(tokens: &[TokenInfo]) -> Value {
    json!({"content": tokens.iter().map(|t| json!({
        "token": t.text, "logprob": t.logprob, "bytes": t.bytes,
        "top_logprobs": t.top.iter().map(|(s, l)| json!({"token": s, "logprob": l, "bytes": s.as_bytes()})).collect::<Vec<_>>(),
    })).collect::<Vec<_>>()})
}

type SseStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<SseEvent, Infallible>> + Send>>;

/// Server-sent events from engine events: `chunk(text, tokens, finish)` makes each JSON chunk.
fn sse(
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    first: Option<Value>,
    include_usage: bool,
    chunk: impl Fn(&str, &[TokenInfo], Option<&str>) -> Value + Send + Sync + 'static,
    usage_chunk: impl Fn(Value) -> Value + Send + Sync + 'static,
) -> Response {
    let chunk = Arc::new(chunk);
    let usage_chunk = Arc::new(usage_chunk);
    let head =
        futures_util::stream::iter(first.map(|v| Ok(SseEvent::default().data(v.to_string()))));
    let body = futures_util::stream::unfold(Some(rx), move |state| {
        let chunk = chunk.clone();
        let usage_chunk = usage_chunk.clone();
        let out = async move {
            let mut rx = state?;
            let mut events: Vec<Value> = Vec::new();
            let mut done = false;
            match rx.recv().await {
                Some(Event::Text { text, tokens }) => events.push(chunk(&text, &tokens, None)),
                Some(Event::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    events.push(chunk("", &[], Some(finish_reason)));
                    if include_usage {
                        events.push(usage_chunk(usage(prompt_tokens, completion_tokens)));
                    }
                    done = true;
                }
                Some(Event::Error(e)) => {
                    events.push(json!({"error": {"message": e, "type": "server_error", "param": null, "code": "generation_failed"}}));
                    done = true;
                }
                None => done = true,
            }
            let mut items: Vec<Result<SseEvent, Infallible>> = events
                .into_iter()
                .map(|v| Ok(SseEvent::default().data(v.to_string())))
                .collect();
            if done {
                items.push(Ok(SseEvent::default().data("[DONE]")));
            }
            Some((
                futures_util::stream::iter(items),
                if done { None } else { Some(rx) },
            ))
        };
        out
    });
    use futures_util::StreamExt;
    let stream: SseStream = Box::pin(head.chain(body.flatten()));
    Sse::new(stream).into_response()
}

async fn completions(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    match completions_inner(app, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(app: App, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    check_auth(&app, &headers)?;
    let m = read_json(&app, &headers, body).await?;
    let c = parse_common(&app, &m)?;
    let f = Fields(&m);
    let tok = &app.served.shared.tok;
    let prompt = match f.get("prompt") {
        Some(Value::String(s)) => tok
            .encode_with_special(s)
            .map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))?,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => tok
            .encode_with_special(a[0].as_str().unwrap_or(""))
            .map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))?,
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|x| x.is_u64()) => {
            let ids: Vec<u32> = a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect();
            let v = app.served.shared.model.vocab_size();
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= v) {
                return Err(ApiError::bad(
                    format!("token id {bad} is outside the vocabulary (size {v})"),
                    Some("prompt"),
                ));
            }
            ids
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::bad(
                "prompt must be a string, a list of one string, or a list of token ids",
                Some("prompt"),
            ))
        }
        Some(_) => return Err(ApiError::bad("prompt must be a string", Some("prompt"))),
        None => return Err(ApiError::bad("prompt is required", Some("prompt"))),
    };
    let logprobs = f.int("logprobs", 0, 20)?.map(|x| x as usize);
    if f.bool("echo")? {
        return Err(ApiError::bad("echo is not supported", Some("echo")));
    }
    let rx = submit(&app, prompt, &c, 16, logprobs)?;
    let id = format!("cmpl-{}", app.counter.fetch_add(1, Ordering::Relaxed));
    let model = app.served.model_id.clone();
    let created = now();
    if c.stream {
        let (id2, model2) = (id.clone(), model.clone());
        return Ok(sse(
            rx,
            None,
            c.include_usage,
            move |text, tokens, finish| {
                json!({"id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish,
                        "logprobs": if logprobs.is_some() && finish.is_none() { completion_logprobs(tokens, logprobs.unwrap_or(0) > 0) } else { Value::Null }}]})
            },
            move |u| json!({"id": id2, "object": "text_completion", "created": created, "model": model2, "choices": [], "usage": u}),
        ));
    }
    let (text, tokens, reason, p, n) = collect(rx).await?;
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": reason,
            "logprobs": if logprobs.is_some() { completion_logprobs(&tokens, logprobs.unwrap_or(0) > 0) } else { Value::Null }}],
        "usage": usage(p, n),
    }))
    .into_response())
}

async fn chat(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    match chat_inner(app, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn parse_messages(v: Option<&Value>) -> Result<Vec<Message>, ApiError> {
    let Some(Value::Array(list)) = v else {
        return Err(ApiError::bad(
            "messages must be a list of {role, content} objects",
            Some("messages"),
        ));
    };
    if list.is_empty() {
        return Err(ApiError::bad("messages is empty", Some("messages")));
    }
    list.iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                ApiError::bad("each message needs a string role", Some("messages"))
            })?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(
                        |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => Ok(t.clone()),
                            _ => Err(ApiError::bad(
                                "only text content parts are supported",
                                Some("messages"),
                            )),
                        },
                    )
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                None | Some(Value::Null) => String::new(),
                Some(_) => {
                    return Err(ApiError::bad(
                        "message content must be a string or a list of text parts",
                        Some("messages"),
                    ))
                }
            };
            Ok(Message::new(role, &content))
        })
        .collect()
}

async fn chat_inner(app: App, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    check_auth(&app, &headers)?;
    let m = read_json(&app, &headers, body).await?;
    let c = parse_common(&app, &m)?;
    let f = Fields(&m);
    let messages = parse_messages(f.get("messages"))?;
    if app.served.template.is_none() {
        return Err(ApiError::bad(
            "this model has no chat template; use /v1/completions",
            Some("messages"),
        ));
    }
    let text = render_off_runtime(&app, messages).await?;
    let prompt = app
        .served
        .shared
        .tok
        .encode(&text)
        .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    let logprobs = if f.bool("logprobs")? {
        Some(f.int("top_logprobs", 0, 20)?.unwrap_or(0) as usize)
    } else {
        if f.get("top_logprobs").is_some() {
            return Err(ApiError::bad(
                "top_logprobs needs logprobs: true",
                Some("top_logprobs"),
            ));
        }
        None
    };
    let rx = submit(&app, prompt, &c, 1024, logprobs)?;
    let id = format!("chatcmpl-{}", app.counter.fetch_add(1, Ordering::Relaxed));
    let model = app.served.model_id.clone();
    let created = now();
    if c.stream {
        let first = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null}]});
        let (id2, model2) = (id.clone(), model.clone());
        return Ok(sse(
            rx,
            Some(first),
            c.include_usage,
            move |text, tokens, finish| {
                let delta = if finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                        "logprobs": if logprobs.is_some() && finish.is_none() { chat_logprobs(tokens) } else { Value::Null }}]})
            },
            move |u| json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2, "choices": [], "usage": u}),
        ));
    }
    let (text, tokens, reason, p, n) = collect(rx).await?;
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
            "logprobs": if logprobs.is_some() { chat_logprobs(&tokens) } else { Value::Null }}],
        "usage": usage(p, n),
    }))
    .into_response())
}

/// The playground and explain view: one self-contained page, embedded in the binary.
const PAGE: &str = include_str!("page.html");

async fn page() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE,
    )
        .into_response()
}

async fn info(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    check_auth(&app, &headers)?;
    let m = &app.served.shared.model;
    let (layers, heads) = m.layers_heads();
    Ok(Json(json!({
        "id": app.served.model_id, "architecture": m.architecture(), "layers": layers,
        "heads": heads, "context": m.context(), "vocab_size": m.vocab_size(),
        "chat_template": app.served.template.is_some(), "description": m.describe(),
    })))
}

/// The chat template rendered on a blocking thread (a template is code from a file: even
/// bounded by its step and output limits it must not hold up the workers that answer
/// /health), given at most [`TEMPLATE_SECONDS`].
async fn render_off_runtime(app: &App, messages: Vec<Message>) -> Result<String, ApiError> {
    let app2 = app.clone();
    let job = tokio::task::spawn_blocking(move || {
        let t = app2
            .served
            .template
            .as_ref()
            .expect("checked by the caller");
        t.render(&messages, true)
    });
    match tokio::time::timeout(std::time::Duration::from_secs(TEMPLATE_SECONDS), job).await {
        Ok(Ok(r)) => r.map_err(|e| ApiError::bad(e.to_string(), Some("messages"))),
        Ok(Err(e)) => Err(ApiError::with(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "template_failed",
            e.to_string(),
        )),
        Err(_) => Err(ApiError::bad(
            format!("the chat template took more than {TEMPLATE_SECONDS} s; stopped"),
            Some("messages"),
        )),
    }
}

/// Seconds a chat template may take in a request.
const TEMPLATE_SECONDS: u64 = 10;

/// The prompt of an extension request: `messages` (through the chat template) or `prompt`.
fn prompt_ids(app: &AppState, f: &Fields) -> Result<Vec<u32>, ApiError> {
    let tok = &app.served.shared.tok;
    if f.get("messages").is_some() {
        let messages = parse_messages(f.get("messages"))?;
        let Some(t) = &app.served.template else {
            return Err(ApiError::bad(
                "this model has no chat template",
                Some("messages"),
            ));
        };
        let text = t
            .render(&messages, true)
            .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
        return tok
            .encode(&text)
            .map_err(|e| ApiError::bad(e.to_string(), Some("messages")));
    }
    match f.get("prompt") {
        Some(Value::String(p)) => tok
            .encode_with_special(p)
            .map_err(|e| ApiError::bad(e.to_string(), Some("prompt"))),
        _ => Err(ApiError::bad("prompt must be a string", Some("prompt"))),
    }
}

/// `POST /v1/quill/explain` {prompt | messages, max_tokens, temperature, top_k, top_p, seed,
/// top}: the prompt's per-token surprisal and, for each generated token, the distribution
/// it was drawn from and the cut applied to it.
async fn explain(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        check_auth(&app, &headers)?;
        let m = read_json(&app, &headers, body).await?;
        let c = parse_common(&app, &m)?;
        let f = Fields(&m);
        let ids = prompt_ids(&app, &f)?;
        if ids.is_empty() {
            return Err(ApiError::bad("the prompt is empty", Some("prompt")));
        }
        let ctx = app.served.shared.model.context();
        if ids.len() >= ctx {
            return Err(ApiError::bad(
                format!("the prompt has {} tokens; the context is {ctx}", ids.len()),
                Some("prompt"),
            ));
        }
        let steps = c.max_tokens.unwrap_or(16).min(256).min(ctx - ids.len());
        let top = f.int("top", 1, 100)?.unwrap_or(20) as usize;
        let app2 = app.clone();
        let ex = tokio::task::spawn_blocking(move || {
            let sh = &app2.served.shared;
            quill::explain::explain(
                &sh.model,
                &sh.tok,
                &ids,
                c.sampling,
                quill::explain::Size { steps, top },
                &sh.eos,
            )
        })
        .await
        .map_err(|e| {
            ApiError::with(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "explain_failed",
                e.to_string(),
            )
        })?
        .map_err(|e| ApiError::bad(e.to_string(), None))?;
        Ok(Json(serde_json::to_value(&ex).unwrap_or(Value::Null)).into_response())
    }
    .await;
    r.unwrap_or_else(|e: ApiError| e.into_response())
}

/// An array of token ids under `name` (absent: none).
fn token_ids(f: &Fields, name: &'static str) -> Result<Vec<u32>, ApiError> {
    let bad = || ApiError::bad(format!("{name} must be an array of token ids"), Some(name));
    match f.get(name) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().and_then(|v| u32::try_from(v).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

/// `POST /v1/quill/cut` {ids, generated, temperature, top_k, top_p, min_p, penalties, top}:
/// the distribution a draw after the prompt `ids` and the tokens `generated` after it would
/// choose from under these settings, and what the cut keeps (what the explain view's
/// sliders show; the page computes no probabilities itself).
async fn cut(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        check_auth(&app, &headers)?;
        let m = read_json(&app, &headers, body).await?;
        let c = parse_common(&app, &m)?;
        let f = Fields(&m);
        let ids = token_ids(&f, "ids")?;
        let generated = token_ids(&f, "generated")?;
        let top = f.int("top", 1, 100)?.unwrap_or(20) as usize;
        let app2 = app.clone();
        let cut = tokio::task::spawn_blocking(move || {
            let sh = &app2.served.shared;
            quill::explain::recut(&sh.model, &sh.tok, &ids, &generated, c.sampling, top)
        })
        .await
        .map_err(|e| {
            ApiError::with(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "cut_failed",
                e.to_string(),
            )
        })?
        .map_err(|e| ApiError::bad(e.to_string(), Some("ids")))?;
        Ok(Json(serde_json::to_value(&cut).unwrap_or(Value::Null)).into_response())
    }
    .await;
    r.unwrap_or_else(|e: ApiError| e.into_response())
}

/// The body of an attention answer.
#[derive(serde::Serialize)]
struct AttentionOut<'a> {
    layer: usize,
    head: usize,
    ids: &'a [u32],
    tokens: Vec<String>,
    weights: Vec<&'a [f32]>,
}

/// `POST /v1/quill/attention` {prompt | messages | ids, layer, head}: the attention weights
/// [T, T] of one head, with the tokens.
async fn attention(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        check_auth(&app, &headers)?;
        let m = read_json(&app, &headers, body).await?;
        let f = Fields(&m);
        let ids: Vec<u32> = match f.get("ids") {
            Some(_) => token_ids(&f, "ids")?,
            _ => prompt_ids(&app, &f)?,
        };
        let v = app.served.shared.model.vocab_size();
        if ids.is_empty() || ids.iter().any(|&i| i as usize >= v) {
            return Err(ApiError::bad(
                "give at least one token id inside the vocabulary",
                Some("ids"),
            ));
        }
        if ids.len() > MAX_ATTENTION_TOKENS {
            return Err(ApiError::bad(
                format!(
                    "{} tokens: an attention map is drawn for at most {MAX_ATTENTION_TOKENS}",
                    ids.len()
                ),
                Some("ids"),
            ));
        }
        let layer = f.int("layer", 0, i64::MAX)?.unwrap_or(0) as usize;
        let head = f.int("head", 0, i64::MAX)?.unwrap_or(0) as usize;
        let app2 = app.clone();
        // one map at a time: further requests wait their turn instead of each taking cores
        let _turn = ATTENTION_TURN.acquire().await.map_err(|e| {
            ApiError::with(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "attention_failed",
                e.to_string(),
            )
        })?;
        // the map and its JSON (a million numbers at the limit) are made off the runtime, and
        // written straight to bytes: no tree of values, and /health is not kept waiting
        let body = tokio::task::spawn_blocking(move || {
            let shared = &app2.served.shared;
            let map = shared.model.attention_map(&ids, layer, head)?;
            let tokens: Vec<String> = ids
                .iter()
                .map(|&i| shared.tok.decode(&[i]).unwrap_or_default())
                .collect();
            let out = AttentionOut {
                layer,
                head,
                ids: &ids,
                tokens,
                weights: map.chunks(ids.len()).collect(),
            };
            Ok::<_, quill::Error>(serde_json::to_vec(&out).map_err(|e| e.to_string()))
        })
        .await
        .map_err(|e| {
            ApiError::with(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "attention_failed",
                e.to_string(),
            )
        })?
        .map_err(|e| ApiError::bad(e.to_string(), None))?
        .map_err(|e| {
            ApiError::with(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "attention_failed",
                e,
            )
        })?;
        Ok((
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response())
    }
    .await;
    r.unwrap_or_else(|e: ApiError| e.into_response())
}
