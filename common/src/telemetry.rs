//! The binaries' own logs and traces: one `tracing` subscriber that writes the process's logs
//! (JSON or text, as before) and, when an OTLP endpoint is configured, exports the pipeline's
//! spans to a tracing backend (Jaeger, Tempo, an OpenTelemetry Collector).
//!
//! Configured by the OpenTelemetry SDK's standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER`/`_ARG`, `OTEL_SDK_DISABLED`, `OTEL_BSP_*`). With no endpoint nothing
//! of it exists: the pipeline's spans are `debug` spans of our own crates, which the log filter
//! (`LOG_LEVEL`, `info` by default) does not enable, so they cost one disabled-callsite check.
//!
//! Export never blocks the data path: a finished span goes into a bounded queue with
//! `try_send`; a thread of its own batches the queue and exports it. A full queue or a failed
//! export (collector down, refused, timed out) drops spans, counted in
//! `<binary>_trace_spans_dropped_total`; what was exported is counted in
//! `<binary>_trace_spans_exported_total`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use tokio::sync::mpsc;
use tracing::Subscriber;
use tracing::dispatcher::WeakDispatch;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets, filter_fn};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The crates whose spans are the pipeline's trace (their `debug` spans).
const TRACED_CRATES: [&str; 3] = ["logging_agent", "logging_aggregator", "logging_common"];

/// A setting that cannot be used: which variable, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{variable}: {reason}")]
    Setting {
        variable: &'static str,
        reason: String,
    },
    #[error("the OTLP trace exporter cannot be built: {0}")]
    Exporter(String),
}

/// How spans travel to the collector (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
    HttpJson,
}

/// What the `OTEL_*` variables ask for; `None` from [`TraceSettings::from_env`] is "off".
#[derive(Clone, Debug, PartialEq)]
pub struct TraceSettings {
    pub protocol: Protocol,
    pub sampler: SamplerSetting,
    /// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
    pub default_service_name: String,
    pub schedule_delay: Duration,
    pub max_queue_size: usize,
    pub max_export_batch_size: usize,
    pub export_timeout: Duration,
}

/// `OTEL_TRACES_SAMPLER` with its argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamplerSetting {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

impl SamplerSetting {
    fn sampler(self) -> Sampler {
        match self {
            SamplerSetting::AlwaysOn => Sampler::AlwaysOn,
            SamplerSetting::AlwaysOff => Sampler::AlwaysOff,
            SamplerSetting::TraceIdRatio(ratio) => Sampler::TraceIdRatioBased(ratio),
            SamplerSetting::ParentBasedAlwaysOn => {
                Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
            }
            SamplerSetting::ParentBasedAlwaysOff => {
                Sampler::ParentBased(Box::new(Sampler::AlwaysOff))
            }
            SamplerSetting::ParentBasedTraceIdRatio(ratio) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
            }
        }
    }
}

impl TraceSettings {
    /// Reads the standard variables through `var` (the environment, or a table in tests).
    /// `Ok(None)`: tracing is off (no endpoint, `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none`).
    pub fn from_env(
        binary: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<TraceSettings>, TelemetryError> {
        let var = |name: &str| {
            var(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if let Some(disabled) = var("OTEL_SDK_DISABLED") {
            match disabled.to_ascii_lowercase().as_str() {
                "true" => return Ok(None),
                "false" => {}
                _ => {
                    return Err(setting(
                        "OTEL_SDK_DISABLED",
                        format!("{disabled:?} is not true or false"),
                    ));
                }
            }
        }
        match var("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(setting(
                    "OTEL_TRACES_EXPORTER",
                    format!("{other:?} is not supported; use otlp or none"),
                ));
            }
        }
        if var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
            && var("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        {
            return Ok(None);
        }
        let (protocol_variable, protocol) = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(p) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(p)),
            None => (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                var("OTEL_EXPORTER_OTLP_PROTOCOL"),
            ),
        };
        // The specification's default for SDKs is http/protobuf.
        let protocol = match protocol.as_deref() {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some("http/json") => Protocol::HttpJson,
            Some(other) => {
                return Err(setting(
                    protocol_variable,
                    format!("{other:?} is not a protocol; use grpc, http/protobuf or http/json"),
                ));
            }
        };
        let ratio = || -> Result<f64, TelemetryError> {
            let Some(arg) = var("OTEL_TRACES_SAMPLER_ARG") else {
                return Ok(1.0);
            };
            match arg.parse::<f64>() {
                Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
                _ => Err(setting(
                    "OTEL_TRACES_SAMPLER_ARG",
                    format!("{arg:?} is not a ratio between 0 and 1"),
                )),
            }
        };
        let sampler = match var("OTEL_TRACES_SAMPLER").as_deref() {
            None | Some("parentbased_always_on") => SamplerSetting::ParentBasedAlwaysOn,
            Some("always_on") => SamplerSetting::AlwaysOn,
            Some("always_off") => SamplerSetting::AlwaysOff,
            Some("traceidratio") => SamplerSetting::TraceIdRatio(ratio()?),
            Some("parentbased_always_off") => SamplerSetting::ParentBasedAlwaysOff,
            Some("parentbased_traceidratio") => SamplerSetting::ParentBasedTraceIdRatio(ratio()?),
            Some(other) => {
                return Err(setting(
                    "OTEL_TRACES_SAMPLER",
                    format!(
                        "{other:?} is not supported; use always_on, always_off, traceidratio, \
                         parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                    ),
                ));
            }
        };
        let number = |name: &'static str, default: u64| -> Result<u64, TelemetryError> {
            match var(name) {
                None => Ok(default),
                Some(text) => match text.parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(setting(
                        name,
                        format!("{text:?} is not a positive whole number"),
                    )),
                },
            }
        };
        let max_queue_size = number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)? as usize;
        Ok(Some(TraceSettings {
            protocol,
            sampler,
            default_service_name: binary.to_string(),
            schedule_delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)?),
            max_queue_size,
            max_export_batch_size: (number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)? as usize)
                .min(max_queue_size),
            export_timeout: Duration::from_millis(number("OTEL_BSP_EXPORT_TIMEOUT", 30_000)?),
        }))
    }
}

fn setting(variable: &'static str, reason: String) -> TelemetryError {
    TelemetryError::Setting { variable, reason }
}

/// What [`init`] set up; dropping it exports what is still queued (for at most 5 s).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            tracing::warn!(%error, "not every span could be exported before stopping");
        }
    }
}

/// Installs the process's subscriber: logs at `log_level` to stderr (`log_format` `json`,
/// `text`, or anything else for JSON unless stderr is a terminal), and the OTLP trace export
/// when the environment configures one. `binary` names the service (`logging-agent`) and
/// prefixes the metrics (`logging_agent_…`).
pub fn init(
    binary: &'static str,
    log_level: &str,
    log_format: &str,
) -> Result<Telemetry, TelemetryError> {
    let json = match log_format {
        "json" => true,
        "text" => false,
        _ => !std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let settings = TraceSettings::from_env(binary, |name| std::env::var(name).ok())?;
    let log_filter = EnvFilter::try_new(log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(settings) = settings else {
        let logs = log_layer(json, log_filter, None);
        Registry::default().with(logs).init();
        return Ok(Telemetry { provider: None });
    };

    // rustls is built without a default provider (one provider, ring, for everything); the
    // exporter's HTTPS or gRPC-over-TLS client needs one before it is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics_prefix = binary.replace('-', "_");
    let dropped_metric: &'static str =
        Box::leak(format!("{metrics_prefix}_trace_spans_dropped_total").into_boxed_str());
    let exported_metric: &'static str =
        Box::leak(format!("{metrics_prefix}_trace_spans_exported_total").into_boxed_str());
    let resource = resource(&settings.default_service_name);
    let processor =
        QueueProcessor::start(&settings, resource.clone(), exported_metric, dropped_metric)?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(settings.sampler.sampler())
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(binary);

    let traced = TRACED_CRATES.iter().fold(Targets::new(), |t, name| {
        t.with_target(*name, tracing::Level::DEBUG)
    });
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_filter(traced);
    // The log layer also sees the traced spans (not their fields in the output), so that an
    // event can name the span it happened in.
    // (The hint keeps every `trace` callsite, ours and our dependencies', disabled once and
    // for all: a filter without one would have each asked at every call.)
    let our_spans = filter_fn(|meta| {
        meta.is_span() && TRACED_CRATES.iter().any(|c| meta.target().starts_with(c))
    })
    .with_max_level_hint(tracing::level_filters::LevelFilter::DEBUG);
    let dispatch = Arc::new(OnceLock::<WeakDispatch>::new());
    let logs = log_layer(json, log_filter.or(our_spans), Some(dispatch.clone()));
    let subscriber = Registry::default().with(spans).with(logs);
    let installed = tracing::Dispatch::new(subscriber);
    let _ = dispatch.set(installed.downgrade());
    tracing::dispatcher::set_global_default(installed)
        .map_err(|e| TelemetryError::Exporter(format!("a subscriber is already installed: {e}")))?;
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The layer that writes the process's own log lines to stderr, JSON or text; JSON lines
/// name the trace they were written in when `dispatch` (the subscriber, for its spans'
/// OpenTelemetry data) is given.
fn log_layer<S>(
    json: bool,
    filter: impl tracing_subscriber::layer::Filter<S> + Send + Sync + 'static,
    dispatch: Option<Arc<OnceLock<WeakDispatch>>>,
) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        logs.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .map_event_format(|inner| WithTraceIds { inner, dispatch })
            .with_filter(filter)
            .boxed()
    } else {
        logs.with_filter(filter).boxed()
    }
}

/// `service.name` from `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` (both read by the
/// SDK's resource detectors), else the binary's name.
fn resource(default_service_name: &str) -> Resource {
    let detected = Resource::builder().build();
    let named_in_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    if named_in_env {
        return detected;
    }
    Resource::builder()
        .with_service_name(default_service_name.to_string())
        .build()
}

/// The JSON event format with `trace_id` and `span_id` of the span the event happened in (a
/// sampled one), so a log line leads to its trace.
struct WithTraceIds<F> {
    inner: F,
    /// The subscriber itself, set once it is built: the OpenTelemetry data of a span is
    /// reached through it (a nested `Span::current()` inside a subscriber sees no subscriber).
    /// `None` when traces are not exported.
    dispatch: Option<Arc<OnceLock<WeakDispatch>>>,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = self.dispatch.as_ref().and_then(|dispatch| {
            let span = ctx.lookup_current()?;
            let dispatch = dispatch.get()?.upgrade()?;
            let cx = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
            let span = cx.span();
            let span_context = span.span_context();
            (span_context.is_valid() && span_context.is_sampled())
                .then(|| (span_context.trace_id(), span_context.span_id()))
        });
        let Some((trace_id, span_id)) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

/// The W3C `traceparent` (and `tracestate`) of `span`, for an outgoing request; empty when the
/// span is not traced.
pub fn trace_headers(span: &tracing::Span) -> HashMap<String, String> {
    let mut headers = HashMap::new();
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut headers);
    }
    headers
}

/// Continues the caller's trace: `span` becomes a child of the `traceparent` a request carried.
/// A malformed header is ignored (the span starts a trace of its own), as the W3C
/// specification asks.
pub fn continue_trace(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_string(), state.to_string());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id (32 hex digits) and span id (16) of `span` when it is sampled (exported).
pub fn sampled_ids(span: &tracing::Span) -> Option<(String, String)> {
    let cx = span.context();
    let span = cx.span();
    let span_context = span.span_context();
    (span_context.is_valid() && span_context.is_sampled()).then(|| {
        (
            span_context.trace_id().to_string(),
            span_context.span_id().to_string(),
        )
    })
}

/// Finished spans in a bounded queue, exported in batches by a thread of its own.
#[derive(Debug)]
struct QueueProcessor {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::UnboundedSender<std::sync::mpsc::SyncSender<()>>,
    dropped_metric: &'static str,
}

impl QueueProcessor {
    /// Starts the export thread; fails when the exporter cannot be built from the settings.
    fn start(
        settings: &TraceSettings,
        resource: Resource,
        exported_metric: &'static str,
        dropped_metric: &'static str,
    ) -> Result<QueueProcessor, TelemetryError> {
        let (spans, queue) = mpsc::channel(settings.max_queue_size);
        let (control, requests) = mpsc::unbounded_channel();
        let (ready, built) = std::sync::mpsc::sync_channel(1);
        let worker = Worker {
            queue,
            requests,
            protocol: settings.protocol,
            schedule_delay: settings.schedule_delay,
            max_batch: settings.max_export_batch_size,
            export_timeout: settings.export_timeout,
            exported_metric,
            dropped_metric,
            last_warning: None,
        };
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(TelemetryError::Exporter(error.to_string())));
                        return;
                    }
                };
                // The gRPC channel spawns its connection onto the runtime it is built in.
                runtime.block_on(worker.run(resource, ready));
            })
            .map_err(|e| {
                TelemetryError::Exporter(format!("cannot start the export thread: {e}"))
            })?;
        built
            .recv()
            .map_err(|_| TelemetryError::Exporter("the export thread stopped".into()))??;
        Ok(QueueProcessor {
            spans,
            control,
            dropped_metric,
        })
    }

    /// Asks the worker to export everything queued, and waits for it up to `timeout`.
    fn flush(&self, timeout: Duration) -> OTelSdkResult {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.control
            .send(done)
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        wait.recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.spans.try_send(span).is_err() {
            metrics::counter!(self.dropped_metric).increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.flush(Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.flush(timeout)
    }
}

struct Worker {
    queue: mpsc::Receiver<SpanData>,
    requests: mpsc::UnboundedReceiver<std::sync::mpsc::SyncSender<()>>,
    protocol: Protocol,
    schedule_delay: Duration,
    max_batch: usize,
    export_timeout: Duration,
    exported_metric: &'static str,
    dropped_metric: &'static str,
    last_warning: Option<Instant>,
}

impl Worker {
    async fn run(
        mut self,
        resource: Resource,
        ready: std::sync::mpsc::SyncSender<Result<(), TelemetryError>>,
    ) {
        let mut exporter = match build_exporter(self.protocol) {
            Ok(exporter) => exporter,
            Err(error) => {
                let _ = ready.send(Err(error));
                return;
            }
        };
        exporter.set_resource(&resource);
        let _ = ready.send(Ok(()));
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut due = tokio::time::Instant::now() + self.schedule_delay;
        loop {
            tokio::select! {
                span = self.queue.recv() => match span {
                    Some(span) => {
                        batch.push(span);
                        if batch.len() >= self.max_batch {
                            self.export(&exporter, &mut batch).await;
                        }
                    }
                    None => break,
                },
                request = self.requests.recv() => {
                    while let Ok(span) = self.queue.try_recv() {
                        batch.push(span);
                        if batch.len() >= self.max_batch {
                            self.export(&exporter, &mut batch).await;
                        }
                    }
                    self.export(&exporter, &mut batch).await;
                    match request {
                        Some(done) => { let _ = done.send(()); }
                        None => break,
                    }
                },
                _ = tokio::time::sleep_until(due) => {
                    self.export(&exporter, &mut batch).await;
                    due = tokio::time::Instant::now() + self.schedule_delay;
                }
            }
        }
        self.export(&exporter, &mut batch).await;
    }

    async fn export(
        &mut self,
        exporter: &opentelemetry_otlp::SpanExporter,
        batch: &mut Vec<SpanData>,
    ) {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::replace(batch, Vec::with_capacity(self.max_batch));
        let count = spans.len() as u64;
        let failure = match tokio::time::timeout(self.export_timeout, exporter.export(spans)).await
        {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!("no answer within {:?}", self.export_timeout)),
        };
        match failure {
            None => metrics::counter!(self.exported_metric).increment(count),
            Some(error) => {
                metrics::counter!(self.dropped_metric).increment(count);
                // One warning a minute at most: a dead collector must not flood the logs.
                if self
                    .last_warning
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
                {
                    self.last_warning = Some(Instant::now());
                    tracing::warn!(%error, spans = count, "cannot export spans to the OTLP collector; they are dropped");
                }
            }
        }
    }
}

/// The OTLP exporter for `protocol`; endpoint, headers, timeout and compression come from the
/// standard variables, which the exporter reads itself.
fn build_exporter(protocol: Protocol) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    let built = match protocol {
        Protocol::Grpc => {
            let builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_protocol(opentelemetry_otlp::Protocol::Grpc);
            // gRPC over TLS trusts the system's roots, as HTTPS does (the exporter's default
            // TLS configuration trusts none).
            let endpoint = [
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()));
            if endpoint.is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("https://")) {
                use opentelemetry_otlp::WithTonicConfig;
                use opentelemetry_otlp::tonic_types::transport::ClientTlsConfig;
                builder
                    .with_tls_config(ClientTlsConfig::new().with_enabled_roots())
                    .build()
            } else {
                builder.build()
            }
        }
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build(),
        Protocol::HttpJson => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
            .build(),
    };
    built.map_err(|e| TelemetryError::Exporter(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Option<TraceSettings>, TelemetryError> {
        let table: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TraceSettings::from_env("logging-agent", |name| table.get(name).cloned())
    }

    #[test]
    fn tracing_is_off_without_an_endpoint_or_when_disabled() {
        assert_eq!(settings(&[]).unwrap(), None);
        assert_eq!(
            settings(&[("OTEL_TRACES_SAMPLER", "always_on")]).unwrap(),
            None
        );
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert_eq!(
            settings(&[endpoint, ("OTEL_SDK_DISABLED", "true")]).unwrap(),
            None
        );
        assert_eq!(
            settings(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]).unwrap(),
            None
        );
        assert!(settings(&[endpoint]).unwrap().is_some());
        assert!(
            settings(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces"
            )])
            .unwrap()
            .is_some()
        );
    }

    #[test]
    fn the_standard_variables_are_read_with_the_specifications_defaults() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        let defaults = settings(&[endpoint]).unwrap().unwrap();
        assert_eq!(defaults.protocol, Protocol::HttpProtobuf);
        assert_eq!(defaults.sampler, SamplerSetting::ParentBasedAlwaysOn);
        assert_eq!(defaults.schedule_delay, Duration::from_secs(5));
        assert_eq!(defaults.max_queue_size, 2048);
        assert_eq!(defaults.max_export_batch_size, 512);
        assert_eq!(defaults.default_service_name, "logging-agent");
        let chosen = settings(&[
            endpoint,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(chosen.protocol, Protocol::Grpc);
        assert_eq!(
            chosen.sampler,
            SamplerSetting::ParentBasedTraceIdRatio(0.01)
        );
        assert_eq!(chosen.schedule_delay, Duration::from_millis(200));
        assert_eq!(
            chosen.max_export_batch_size, 100,
            "a batch never exceeds the queue"
        );
    }

    #[test]
    fn a_wrong_setting_names_its_variable() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        for (vars, variable) in [
            (
                vec![endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                vec![
                    endpoint,
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
                ],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                vec![endpoint, ("OTEL_TRACES_SAMPLER", "sometimes")],
                "OTEL_TRACES_SAMPLER",
            ),
            (
                vec![endpoint, ("OTEL_BSP_MAX_QUEUE_SIZE", "-3")],
                "OTEL_BSP_MAX_QUEUE_SIZE",
            ),
            (vec![("OTEL_SDK_DISABLED", "yes")], "OTEL_SDK_DISABLED"),
        ] {
            let error = settings(&vars).unwrap_err().to_string();
            assert!(error.starts_with(variable), "{error}");
        }
    }

    #[test]
    fn a_traceparent_round_trips_through_the_headers() {
        // Without a subscriber the span is not traced: nothing to send, nothing broken.
        let span = tracing::info_span!("untraced");
        assert!(trace_headers(&span).is_empty());
        continue_trace(&span, "not a traceparent", None);
        assert_eq!(sampled_ids(&span), None);
    }
}
