//! Gateway metrics and their `GET /metrics` rendering (gateway-protocol §6, DESIGN §5).
//!
//! The catalog ([`CATALOG`]) fixes every family the gateway and the devtools, node-output,
//! node-diff and rewind features record: name, type, HELP text (only the gateway catalog
//! metrics carry one, as upstream) and histogram boundaries. [`Metrics::render`] prints
//! Prometheus text exposition format 0.0.4 ([`CONTENT_TYPE`]), with DESIGN §5's fixes:
//! `connections_active` is a real count (use [`Metrics::gauge_add`]), histograms end with a
//! single `le="+Inf"` bucket, and every declared family renders, the node-diff histograms
//! included.
//!
//! The renderer is hand-written on purpose. The well-kept crates do not fit this contract:
//! `prometheus-client` writes OpenMetrics (`# EOF`, `_total` suffix rules, `# UNIT`), not 0.0.4;
//! the `prometheus` crate fixes one label-name set per vector family, while upstream emits
//! several label sets in one family (`errors_total` has `{code,kind,method,transport}` next to
//! `{kind,transport}`), it insists on a HELP text for every family (upstream has HELP only for
//! the gateway catalog) and it omits vector families without samples where we must print
//! `name 0` or zero buckets. The whole format is a few dozen lines, so owning it is cheaper.
//!
//! Storage: one `Mutex<BTreeMap>` per family keyed by the rendered label set, so a recording is
//! one short lock plus one small string build. Label values are capped at
//! [`MAX_LABEL_VALUE_LEN`] bytes and each family at [`MAX_SERIES_PER_FAMILY`] label sets
//! (some label values, e.g. a webhook's workflow key, come from requests); recordings beyond
//! the cap are dropped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// `Content-Type` of the `/metrics` response.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Most label sets one family keeps; recordings of new label sets beyond it are dropped.
pub const MAX_SERIES_PER_FAMILY: usize = 10_000;

/// Longest label value kept (bytes); longer values are cut at a char boundary.
pub const MAX_LABEL_VALUE_LEN: usize = 256;

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The word used on the `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One catalog entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricDef {
    /// Prometheus name (already in `[a-zA-Z0-9_:]`).
    pub name: &'static str,
    pub kind: Kind,
    /// `# HELP` text; `None` prints no HELP line (as upstream for non-gateway families).
    pub help: Option<&'static str>,
    /// Upper bounds of the finite histogram buckets, ascending; empty for counters and gauges.
    /// `+Inf` is implied and never listed.
    pub buckets: &'static [f64],
}

/// `base · 2^k` for `k = 0..N`.
const fn pow2_buckets<const N: usize>(base: f64) -> [f64; N] {
    let mut out = [0.0; N];
    let mut value = base;
    let mut i = 0;
    while i < N {
        out[i] = value;
        value *= 2.0;
        i += 1;
    }
    out
}

/// `rpc_duration_ms`: 100·2^k ms, k = 0..10 (100 ms … 102.4 s), as upstream.
pub const RPC_DURATION_BUCKETS: [f64; 11] = pow2_buckets(100.0);
/// Byte sizes (`devtools_event_bytes`, `node_output_bytes`, `node_diff_bytes`): 100·2^k,
/// k = 0..14 (100 B … 1.6 MB), upstream's devtools event boundaries.
pub const SIZE_BUCKETS: [f64; 15] = pow2_buckets(100.0);
/// Fast timings (snapshot/delta build, `node_output_duration_ms`): 1·2^k ms, k = 0..10.
pub const FAST_MS_BUCKETS: [f64; 11] = pow2_buckets(1.0);
/// `node_diff_compute_ms` (not given upstream): 1·2^k ms, k = 0..12 (1 ms … 4.1 s); a diff may
/// read two full snapshots, so it reaches further than the build timings.
pub const DIFF_COMPUTE_MS_BUCKETS: [f64; 13] = pow2_buckets(1.0);
/// `rewind_duration_ms` (not given upstream): 10·2^k ms, k = 0..12 (10 ms … 41 s); a rewind
/// deletes rows and reverts sandboxes.
pub const REWIND_DURATION_MS_BUCKETS: [f64; 13] = pow2_buckets(10.0);
/// Small counts (`rewind_frames_deleted`, `rewind_sandboxes_reverted`): 1·2^k, k = 0..10.
pub const COUNT_BUCKETS: [f64; 11] = pow2_buckets(1.0);

/// Metric names, for typo-free calls.
pub mod names {
    pub const DEVTOOLS_ACTIVE_SUBSCRIBERS: &str = "smithers_devtools_active_subscribers";
    pub const DEVTOOLS_BACKPRESSURE_DISCONNECT_TOTAL: &str =
        "smithers_devtools_backpressure_disconnect_total";
    pub const DEVTOOLS_DELTA_BUILD_MS: &str = "smithers_devtools_delta_build_ms";
    pub const DEVTOOLS_EVENT_BYTES: &str = "smithers_devtools_event_bytes";
    pub const DEVTOOLS_EVENT_TOTAL: &str = "smithers_devtools_event_total";
    pub const DEVTOOLS_RUN_POLLERS: &str = "smithers_devtools_run_pollers";
    pub const DEVTOOLS_SNAPSHOT_BUILD_MS: &str = "smithers_devtools_snapshot_build_ms";
    pub const DEVTOOLS_SUBSCRIBE_TOTAL: &str = "smithers_devtools_subscribe_total";
    pub const APPROVAL_DECISIONS_TOTAL: &str = "smithers_gateway_approval_decisions_total";
    pub const AUTH_EVENTS_TOTAL: &str = "smithers_gateway_auth_events_total";
    pub const CONNECTIONS_ACTIVE: &str = "smithers_gateway_connections_active";
    pub const CONNECTIONS_CLOSED_TOTAL: &str = "smithers_gateway_connections_closed_total";
    pub const CONNECTIONS_TCP_OPEN: &str = "smithers_gateway_connections_tcp_open";
    pub const CONNECTIONS_TOTAL: &str = "smithers_gateway_connections_total";
    pub const CRON_TRIGGERS_TOTAL: &str = "smithers_gateway_cron_triggers_total";
    pub const ERRORS_TOTAL: &str = "smithers_gateway_errors_total";
    pub const HEARTBEAT_TICKS_TOTAL: &str = "smithers_gateway_heartbeat_ticks_total";
    pub const MESSAGES_RECEIVED_TOTAL: &str = "smithers_gateway_messages_received_total";
    pub const MESSAGES_SENT_TOTAL: &str = "smithers_gateway_messages_sent_total";
    pub const RPC_CALLS_TOTAL: &str = "smithers_gateway_rpc_calls_total";
    pub const RPC_DURATION_MS: &str = "smithers_gateway_rpc_duration_ms";
    pub const RUNS_COMPLETED_TOTAL: &str = "smithers_gateway_runs_completed_total";
    pub const RUNS_STARTED_TOTAL: &str = "smithers_gateway_runs_started_total";
    pub const SIGNALS_TOTAL: &str = "smithers_gateway_signals_total";
    pub const SLOW_CONSUMER_DISCONNECTS_TOTAL: &str =
        "smithers_gateway_slow_consumer_disconnects_total";
    pub const WEBHOOKS_RECEIVED_TOTAL: &str = "smithers_gateway_webhooks_received_total";
    pub const WEBHOOKS_REJECTED_TOTAL: &str = "smithers_gateway_webhooks_rejected_total";
    pub const WEBHOOKS_VERIFIED_TOTAL: &str = "smithers_gateway_webhooks_verified_total";
    pub const NODE_DIFF_BYTES: &str = "smithers_node_diff_bytes";
    pub const NODE_DIFF_CACHE_ROWS: &str = "smithers_node_diff_cache_rows";
    pub const NODE_DIFF_CACHE_TOTAL: &str = "smithers_node_diff_cache_total";
    pub const NODE_DIFF_COMPUTE_MS: &str = "smithers_node_diff_compute_ms";
    pub const NODE_DIFF_REQUEST_TOTAL: &str = "smithers_node_diff_request_total";
    pub const NODE_OUTPUT_BYTES: &str = "smithers_node_output_bytes";
    pub const NODE_OUTPUT_DURATION_MS: &str = "smithers_node_output_duration_ms";
    pub const NODE_OUTPUT_REQUEST_TOTAL: &str = "smithers_node_output_request_total";
    pub const NODE_OUTPUT_SCHEMA_CONVERSION_ERROR_TOTAL: &str =
        "smithers_node_output_schema_conversion_error_total";
    pub const REWIND_DURATION_MS: &str = "smithers_rewind_duration_ms";
    pub const REWIND_FRAMES_DELETED: &str = "smithers_rewind_frames_deleted";
    pub const REWIND_ROLLBACK_TOTAL: &str = "smithers_rewind_rollback_total";
    pub const REWIND_SANDBOXES_REVERTED: &str = "smithers_rewind_sandboxes_reverted";
    pub const REWIND_TOTAL: &str = "smithers_rewind_total";
}

const fn counter(name: &'static str, help: Option<&'static str>) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Counter,
        help,
        buckets: &[],
    }
}

const fn gauge(name: &'static str, help: Option<&'static str>) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Gauge,
        help,
        buckets: &[],
    }
}

const fn histogram(
    name: &'static str,
    help: Option<&'static str>,
    buckets: &'static [f64],
) -> MetricDef {
    MetricDef {
        name,
        kind: Kind::Histogram,
        help,
        buckets,
    }
}

/// Every family, sorted by name (the render order; lookups binary-search it).
pub const CATALOG: &[MetricDef] = {
    use names::*;
    &[
        gauge(DEVTOOLS_ACTIVE_SUBSCRIBERS, None),
        counter(DEVTOOLS_BACKPRESSURE_DISCONNECT_TOTAL, None),
        histogram(DEVTOOLS_DELTA_BUILD_MS, None, &FAST_MS_BUCKETS),
        histogram(DEVTOOLS_EVENT_BYTES, None, &SIZE_BUCKETS),
        counter(DEVTOOLS_EVENT_TOTAL, None),
        gauge(DEVTOOLS_RUN_POLLERS, None),
        histogram(DEVTOOLS_SNAPSHOT_BUILD_MS, None, &FAST_MS_BUCKETS),
        counter(DEVTOOLS_SUBSCRIBE_TOTAL, None),
        counter(APPROVAL_DECISIONS_TOTAL, Some("Gateway approval decisions")),
        counter(AUTH_EVENTS_TOTAL, Some("Gateway auth events")),
        gauge(CONNECTIONS_ACTIVE, Some("Active gateway connections")),
        counter(CONNECTIONS_CLOSED_TOTAL, Some("Gateway connections closed")),
        gauge(CONNECTIONS_TCP_OPEN, None),
        counter(CONNECTIONS_TOTAL, Some("Gateway connections opened")),
        counter(CRON_TRIGGERS_TOTAL, Some("Gateway cron triggers")),
        counter(ERRORS_TOTAL, Some("Gateway errors")),
        counter(HEARTBEAT_TICKS_TOTAL, Some("Gateway heartbeats")),
        counter(MESSAGES_RECEIVED_TOTAL, Some("Gateway messages received")),
        counter(MESSAGES_SENT_TOTAL, Some("Gateway messages sent")),
        counter(RPC_CALLS_TOTAL, Some("Gateway RPC calls")),
        histogram(
            RPC_DURATION_MS,
            Some("Gateway RPC duration"),
            &RPC_DURATION_BUCKETS,
        ),
        counter(RUNS_COMPLETED_TOTAL, Some("Gateway runs completed")),
        counter(RUNS_STARTED_TOTAL, Some("Gateway runs started")),
        counter(SIGNALS_TOTAL, Some("Gateway signals")),
        counter(
            SLOW_CONSUMER_DISCONNECTS_TOTAL,
            Some("Gateway clients disconnected as too slow to read"),
        ),
        counter(WEBHOOKS_RECEIVED_TOTAL, Some("Gateway webhooks received")),
        counter(WEBHOOKS_REJECTED_TOTAL, Some("Gateway webhooks rejected")),
        counter(WEBHOOKS_VERIFIED_TOTAL, Some("Gateway webhooks verified")),
        histogram(NODE_DIFF_BYTES, None, &SIZE_BUCKETS),
        gauge(NODE_DIFF_CACHE_ROWS, None),
        counter(NODE_DIFF_CACHE_TOTAL, None),
        histogram(NODE_DIFF_COMPUTE_MS, None, &DIFF_COMPUTE_MS_BUCKETS),
        counter(NODE_DIFF_REQUEST_TOTAL, None),
        histogram(NODE_OUTPUT_BYTES, None, &SIZE_BUCKETS),
        histogram(NODE_OUTPUT_DURATION_MS, None, &FAST_MS_BUCKETS),
        counter(NODE_OUTPUT_REQUEST_TOTAL, None),
        counter(NODE_OUTPUT_SCHEMA_CONVERSION_ERROR_TOTAL, None),
        histogram(REWIND_DURATION_MS, None, &REWIND_DURATION_MS_BUCKETS),
        histogram(REWIND_FRAMES_DELETED, None, &COUNT_BUCKETS),
        counter(REWIND_ROLLBACK_TOTAL, None),
        histogram(REWIND_SANDBOXES_REVERTED, None, &COUNT_BUCKETS),
        counter(REWIND_TOTAL, None),
    ]
};

/// The catalog entry for `name`.
pub fn lookup(name: &str) -> Option<&'static MetricDef> {
    CATALOG
        .binary_search_by(|def| def.name.cmp(name))
        .ok()
        .map(|i| &CATALOG[i])
}

/// Labels as the gateway passes them: `(key, value)` pairs in any order.
pub type Labels<'a> = [(&'a str, &'a str)];

#[derive(Debug, Clone)]
enum Series {
    Scalar(f64),
    /// Per-bucket (not cumulative) counts, one per finite boundary plus one for `+Inf`.
    Histogram {
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

struct Family {
    def: &'static MetricDef,
    /// Keyed by the rendered label set (`k="v",…`, keys sorted; empty for no labels).
    series: Mutex<BTreeMap<String, Series>>,
}

/// The gateway's metric registry. Share it as `Arc<Metrics>`; every method takes `&self`.
///
/// Recording methods return whether the sample was recorded: `false` for a name missing from
/// [`CATALOG`], a method that does not fit the family's type, a non-finite value (or a negative
/// counter increment), or a new label set beyond [`MAX_SERIES_PER_FAMILY`]. They never panic.
pub struct Metrics {
    families: Vec<Family>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("families", &self.families.len())
            .finish()
    }
}

impl Metrics {
    /// A registry with every catalog family and no samples.
    pub fn new() -> Self {
        let families = CATALOG
            .iter()
            .map(|def| Family {
                def,
                series: Mutex::new(BTreeMap::new()),
            })
            .collect();
        Metrics { families }
    }

    fn family(&self, name: &str, kind: Kind) -> Option<&Family> {
        let i = CATALOG.binary_search_by(|def| def.name.cmp(name)).ok()?;
        let family = self.families.get(i)?;
        (family.def.kind == kind).then_some(family)
    }

    /// Applies `update` to the series of `labels`, creating it with `init` if the cap allows.
    fn update(
        &self,
        name: &str,
        kind: Kind,
        labels: &Labels<'_>,
        init: impl FnOnce(&MetricDef) -> Series,
        update: impl FnOnce(&mut Series),
    ) -> bool {
        let Some(family) = self.family(name, kind) else {
            return false;
        };
        let key = label_key(labels, kind == Kind::Histogram);
        let mut series = lock(&family.series);
        if let Some(existing) = series.get_mut(&key) {
            update(existing);
            return true;
        }
        if series.len() >= MAX_SERIES_PER_FAMILY {
            return false;
        }
        let mut fresh = init(family.def);
        update(&mut fresh);
        series.insert(key, fresh);
        true
    }

    /// Adds 1 to a counter.
    pub fn inc(&self, name: &str, labels: &Labels<'_>) -> bool {
        self.add(name, labels, 1.0)
    }

    /// Adds `value` (finite, ≥ 0) to a counter.
    pub fn add(&self, name: &str, labels: &Labels<'_>, value: f64) -> bool {
        if !value.is_finite() || value < 0.0 {
            return false;
        }
        self.update(
            name,
            Kind::Counter,
            labels,
            |_| Series::Scalar(0.0),
            |s| {
                if let Series::Scalar(v) = s {
                    *v += value;
                }
            },
        )
    }

    /// Sets a gauge to `value` (finite).
    pub fn set_gauge(&self, name: &str, labels: &Labels<'_>, value: f64) -> bool {
        if !value.is_finite() {
            return false;
        }
        self.update(
            name,
            Kind::Gauge,
            labels,
            |_| Series::Scalar(0.0),
            |s| *s = Series::Scalar(value),
        )
    }

    /// Adds `delta` (finite, may be negative) to a gauge, e.g. +1 on open and −1 on close.
    pub fn gauge_add(&self, name: &str, labels: &Labels<'_>, delta: f64) -> bool {
        if !delta.is_finite() {
            return false;
        }
        self.update(
            name,
            Kind::Gauge,
            labels,
            |_| Series::Scalar(0.0),
            |s| {
                if let Series::Scalar(v) = s {
                    *v += delta;
                }
            },
        )
    }

    /// Records one histogram observation (finite). A `le` label is reserved and dropped.
    pub fn observe(&self, name: &str, labels: &Labels<'_>, value: f64) -> bool {
        if !value.is_finite() {
            return false;
        }
        let Some(def) = lookup(name) else {
            return false;
        };
        // First bucket whose bound is ≥ value; `buckets.len()` is the +Inf slot.
        let slot = def.buckets.partition_point(|bound| *bound < value);
        self.update(
            name,
            Kind::Histogram,
            labels,
            |def| Series::Histogram {
                counts: vec![0; def.buckets.len() + 1],
                sum: 0.0,
                count: 0,
            },
            |s| {
                if let Series::Histogram { counts, sum, count } = s {
                    if let Some(c) = counts.get_mut(slot) {
                        *c += 1;
                    }
                    *sum += value;
                    *count += 1;
                }
            },
        )
    }

    /// Records a duration in milliseconds (fractional) on a histogram.
    pub fn observe_duration(&self, name: &str, labels: &Labels<'_>, elapsed: Duration) -> bool {
        self.observe(name, labels, elapsed.as_secs_f64() * 1000.0)
    }

    /// Drops the series of `labels` (e.g. a gauge of a run nobody watches any more).
    pub fn remove(&self, name: &str, labels: &Labels<'_>) -> bool {
        let Some(def) = lookup(name) else {
            return false;
        };
        let Some(family) = self.family(name, def.kind) else {
            return false;
        };
        let key = label_key(labels, def.kind == Kind::Histogram);
        lock(&family.series).remove(&key).is_some()
    }

    /// The current value of a counter or gauge series, if it has been recorded.
    pub fn get(&self, name: &str, labels: &Labels<'_>) -> Option<f64> {
        let def = lookup(name)?;
        if def.kind == Kind::Histogram {
            return None;
        }
        let family = self.family(name, def.kind)?;
        match lock(&family.series).get(&label_key(labels, false))? {
            Series::Scalar(v) => Some(*v),
            Series::Histogram { .. } => None,
        }
    }

    /// `(count, sum)` of a histogram series, if it has been recorded.
    pub fn histogram_totals(&self, name: &str, labels: &Labels<'_>) -> Option<(u64, f64)> {
        let family = self.family(name, Kind::Histogram)?;
        match lock(&family.series).get(&label_key(labels, true))? {
            Series::Histogram { sum, count, .. } => Some((*count, *sum)),
            Series::Scalar(_) => None,
        }
    }

    /// Records a WebSocket (or other transport) connection opening: `connections_total` +1 and
    /// `connections_active` +1.
    pub fn connection_opened(&self, transport: &str) {
        let labels = [("transport", transport)];
        self.inc(names::CONNECTIONS_TOTAL, &labels);
        self.gauge_add(names::CONNECTIONS_ACTIVE, &labels, 1.0);
    }

    /// Records a connection closing: `connections_closed_total{reason}` +1 and
    /// `connections_active` −1. `reason` is `"close"` or `"error"`.
    pub fn connection_closed(&self, transport: &str, reason: &str) {
        self.inc(
            names::CONNECTIONS_CLOSED_TOTAL,
            &[("reason", reason), ("transport", transport)],
        );
        self.gauge_add(names::CONNECTIONS_ACTIVE, &[("transport", transport)], -1.0);
    }

    /// Records one RPC call: `rpc_calls_total` +1 and its duration on `rpc_duration_ms`.
    pub fn rpc_call(&self, method: &str, transport: &str, elapsed: Duration) {
        let labels = [("method", method), ("transport", transport)];
        self.inc(names::RPC_CALLS_TOTAL, &labels);
        self.observe_duration(names::RPC_DURATION_MS, &labels, elapsed);
    }

    /// The whole registry in Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        for family in &self.families {
            let def = family.def;
            if let Some(help) = def.help {
                let _ = writeln!(out, "# HELP {} {}", def.name, escape_help(help));
            }
            let _ = writeln!(out, "# TYPE {} {}", def.name, def.kind.as_str());
            let series = lock(&family.series);
            if series.is_empty() {
                match def.kind {
                    Kind::Counter | Kind::Gauge => {
                        let _ = writeln!(out, "{} 0", def.name);
                    }
                    Kind::Histogram => {
                        let counts = vec![0; def.buckets.len() + 1];
                        render_histogram(&mut out, def, "", &counts, 0.0, 0);
                    }
                }
                continue;
            }
            for (key, value) in series.iter() {
                match value {
                    Series::Scalar(v) => {
                        out.push_str(def.name);
                        if !key.is_empty() {
                            let _ = write!(out, "{{{key}}}");
                        }
                        let _ = writeln!(out, " {}", format_value(*v));
                    }
                    Series::Histogram { counts, sum, count } => {
                        render_histogram(&mut out, def, key, counts, *sum, *count);
                    }
                }
            }
        }
        out
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a map half-updated in a harmful way.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn render_histogram(
    out: &mut String,
    def: &MetricDef,
    key: &str,
    counts: &[u64],
    sum: f64,
    count: u64,
) {
    let sep = if key.is_empty() { "" } else { "," };
    let mut cumulative = 0u64;
    for (i, bound) in def.buckets.iter().enumerate() {
        cumulative += counts.get(i).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{}_bucket{{{key}{sep}le=\"{}\"}} {cumulative}",
            def.name,
            format_value(*bound)
        );
    }
    // The +Inf bucket holds every observation by definition.
    let _ = writeln!(out, "{}_bucket{{{key}{sep}le=\"+Inf\"}} {count}", def.name);
    let braces = if key.is_empty() {
        String::new()
    } else {
        format!("{{{key}}}")
    };
    let _ = writeln!(out, "{}_sum{braces} {}", def.name, format_value(sum));
    let _ = writeln!(out, "{}_count{braces} {count}", def.name);
}

/// Renders `labels` as `k="v",…` with keys sanitized and sorted (last duplicate wins) and
/// values escaped and capped. `drop_le` removes a `le` key (reserved on histograms).
fn label_key(labels: &Labels<'_>, drop_le: bool) -> String {
    // Every call site passes valid names in order: written out directly, with no map and no
    // copies (this runs for every counter update, several times per request and per run).
    let plain = labels.iter().enumerate().all(|(i, (key, _))| {
        is_label_name(key) && !(drop_le && *key == "le") && (i == 0 || labels[i - 1].0 < *key)
    });
    if plain {
        return render_label_pairs(labels.iter().copied());
    }
    label_key_general(labels, drop_le)
}

/// [`label_key`] for any labels: names sanitized, sorted, the last duplicate winning.
fn label_key_general(labels: &Labels<'_>, drop_le: bool) -> String {
    let mut pairs: BTreeMap<String, &str> = BTreeMap::new();
    for (key, value) in labels {
        let key = sanitize_label_name(key);
        if drop_le && key == "le" {
            continue;
        }
        pairs.insert(key, value);
    }
    render_label_pairs(pairs.iter().map(|(k, v)| (k.as_str(), *v)))
}

/// `k="v",…` in the given order, values escaped and capped.
fn render_label_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    // room for the usual three or four short labels, so the key is built without regrowing
    let mut out = String::with_capacity(96);
    for (i, (key, value)) in pairs.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push_str("=\"");
        escape_label_value(&mut out, truncate(value, MAX_LABEL_VALUE_LEN));
        out.push('"');
    }
    out
}

/// Whether `sanitize_label_name` would leave `name` as it is.
fn is_label_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Every char outside `[a-zA-Z0-9_]` becomes `_`; a leading digit (or an empty name) gets a
/// `_` prefix.
fn sanitize_label_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn truncate(value: &str, max: usize) -> &str {
    if value.len() <= max {
        return value;
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

fn escape_label_value(out: &mut String, value: &str) {
    // almost every value (a method, a workflow key, a status) has nothing to escape
    if !value.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as Prometheus parses it: integers without `.0`, other floats in Rust's
/// shortest round-trip form, and `+Inf`/`-Inf`/`NaN` spelled the Prometheus way.
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        // Display never uses exponent notation and prints 3.0 as "3".
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    #[test]
    fn the_direct_label_key_is_the_general_one() {
        let cases: [&Labels<'_>; 8] = [
            &[],
            &[("code", "X"), ("kind", "frame"), ("transport", "ws")],
            &[("transport", "ws"), ("method", "runs.create")],
            &[("a", "1"), ("a", "2")],
            &[("le", "0.5"), ("x", "y")],
            &[("bad-name", "v"), ("ok", "q\"uote\n")],
            &[("9lives", "v")],
            &[("long", &"v".repeat(300))],
        ];
        for labels in cases {
            for drop_le in [false, true] {
                assert_eq!(
                    label_key(labels, drop_le),
                    label_key_general(labels, drop_le),
                    "{labels:?} {drop_le}"
                );
            }
        }
    }

    /// One line of Prometheus text format 0.0.4.
    #[derive(Debug, Clone, PartialEq)]
    enum Line {
        Help {
            name: String,
            text: String,
        },
        Type {
            name: String,
            kind: String,
        },
        Sample {
            name: String,
            labels: Vec<(String, String)>,
            value: f64,
        },
    }

    fn is_name_start(c: char) -> bool {
        c.is_ascii_alphabetic() || c == '_' || c == ':'
    }

    fn is_name_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '_' || c == ':'
    }

    fn valid_metric_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars.next().is_some_and(is_name_start) && chars.all(is_name_char)
    }

    fn valid_label_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    fn parse_value(text: &str) -> Result<f64, String> {
        match text {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            _ if text
                .chars()
                .all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) =>
            {
                text.parse().map_err(|e| format!("bad value {text:?}: {e}"))
            }
            _ => Err(format!("bad value {text:?}")),
        }
    }

    fn unescape_help(text: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('\\') => out.push('\\'),
                    Some('n') => out.push('\n'),
                    other => return Err(format!("bad HELP escape {other:?}")),
                }
            } else {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn parse_line(line: &str) -> Result<Line, String> {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').ok_or("HELP without text")?;
            if !valid_metric_name(name) {
                return Err(format!("bad HELP name {name:?}"));
            }
            return Ok(Line::Help {
                name: name.into(),
                text: unescape_help(text)?,
            });
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or("TYPE without type")?;
            if !valid_metric_name(name) {
                return Err(format!("bad TYPE name {name:?}"));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(format!("bad TYPE {kind:?}"));
            }
            return Ok(Line::Type {
                name: name.into(),
                kind: kind.into(),
            });
        }
        if line.starts_with('#') {
            return Err(format!("unexpected comment {line:?}"));
        }
        let name_end = line
            .find(|c: char| !is_name_char(c))
            .ok_or("sample without value")?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(format!("bad sample name {name:?}"));
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices().peekable();
            loop {
                let Some(&(start, c)) = chars.peek() else {
                    return Err("unterminated label set".into());
                };
                if c == '}' {
                    rest = &after[start + 1..];
                    break;
                }
                let mut key = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                    chars.next();
                }
                if !valid_label_name(&key) {
                    return Err(format!("bad label name {key:?}"));
                }
                if chars.next().map(|(_, c)| c) != Some('=')
                    || chars.next().map(|(_, c)| c) != Some('"')
                {
                    return Err("label without =\"".into());
                }
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        None => return Err("unterminated label value".into()),
                        Some('"') => break,
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => return Err(format!("bad label escape {other:?}")),
                        },
                        Some('\n') => return Err("raw newline in label value".into()),
                        Some(c) => value.push(c),
                    }
                }
                labels.push((key, value));
                match chars.peek().map(|&(_, c)| c) {
                    Some(',') => {
                        chars.next();
                    }
                    Some('}') => {}
                    other => return Err(format!("expected , or }} got {other:?}")),
                }
            }
        }
        let value = rest.strip_prefix(' ').ok_or("no space before value")?;
        if value.contains(' ') {
            return Err("timestamps or trailing text not expected".into());
        }
        Ok(Line::Sample {
            name: name.into(),
            labels,
            value: parse_value(value)?,
        })
    }

    fn parse(text: &str) -> Vec<Line> {
        assert!(text.ends_with('\n'), "output must end with a newline");
        text.lines()
            .map(|line| parse_line(line).unwrap_or_else(|e| panic!("line {line:?}: {e}")))
            .collect()
    }

    /// Parsed labels, in output order.
    type ParsedLabels = Vec<(String, String)>;

    /// A parsed family: TYPE, HELP and its samples, in output order.
    #[derive(Debug, Default)]
    struct ParsedFamily {
        kind: String,
        help: Option<String>,
        samples: Vec<(String, ParsedLabels, f64)>,
    }

    /// Parses `render()` output, checking the structure, and returns families in order.
    fn families(text: &str) -> Vec<(String, ParsedFamily)> {
        let mut out: Vec<(String, ParsedFamily)> = Vec::new();
        let mut pending_help: Option<(String, String)> = None;
        for line in parse(text) {
            match line {
                Line::Help { name, text } => {
                    assert!(pending_help.is_none(), "two HELP lines in a row");
                    pending_help = Some((name, text));
                }
                Line::Type { name, kind } => {
                    let help = match pending_help.take() {
                        Some((help_name, text)) => {
                            assert_eq!(help_name, name, "HELP for another family");
                            Some(text)
                        }
                        None => None,
                    };
                    assert!(out.iter().all(|(n, _)| *n != name), "family {name} twice");
                    out.push((
                        name,
                        ParsedFamily {
                            kind,
                            help,
                            samples: Vec::new(),
                        },
                    ));
                }
                Line::Sample {
                    name,
                    labels,
                    value,
                } => {
                    assert!(pending_help.is_none(), "HELP not followed by TYPE");
                    let (family_name, family) = out.last_mut().expect("sample before any TYPE");
                    let belongs = if family.kind == "histogram" {
                        ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|suffix| name == format!("{family_name}{suffix}"))
                    } else {
                        name == *family_name
                    };
                    assert!(belongs, "sample {name} under family {family_name}");
                    family.samples.push((name, labels, value));
                }
            }
        }
        assert!(pending_help.is_none(), "dangling HELP");
        out
    }

    fn family<'a>(parsed: &'a [(String, ParsedFamily)], name: &str) -> &'a ParsedFamily {
        &parsed
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no family {name}"))
            .1
    }

    fn sample(parsed: &[(String, ParsedFamily)], name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Keys sorted, `le` last, as rendered.
        want.sort_by(|a, b| (a.0 == "le", &a.0).cmp(&(b.0 == "le", &b.0)));
        let family_name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| lookup(f).is_some()))
            .unwrap_or(name);
        family(parsed, family_name)
            .samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }

    /// Checks every histogram: per label set the finite boundaries of the catalog in order,
    /// cumulative counts non-decreasing, exactly one `+Inf` equal to `_count`, a `_sum`.
    fn check_histograms(parsed: &[(String, ParsedFamily)]) {
        for (name, fam) in parsed.iter().filter(|(_, f)| f.kind == "histogram") {
            let def = lookup(name).expect("catalog family");
            let mut buckets: HashMap<ParsedLabels, Vec<(String, f64)>> = HashMap::new();
            let mut counts = HashMap::new();
            let mut sums = HashMap::new();
            for (sample_name, labels, value) in &fam.samples {
                if sample_name.ends_with("_bucket") {
                    let (last_key, le) = labels.last().expect("bucket without le");
                    assert_eq!(last_key, "le", "le must be the last label");
                    let rest = labels[..labels.len() - 1].to_vec();
                    buckets.entry(rest).or_default().push((le.clone(), *value));
                } else if sample_name.ends_with("_count") {
                    assert!(
                        counts.insert(labels.clone(), *value).is_none(),
                        "two _count"
                    );
                } else {
                    assert!(sums.insert(labels.clone(), *value).is_none(), "two _sum");
                }
            }
            assert!(!buckets.is_empty(), "{name} renders no buckets");
            assert_eq!(
                buckets.len(),
                counts.len(),
                "{name}: label sets of _bucket/_count"
            );
            assert_eq!(
                buckets.len(),
                sums.len(),
                "{name}: label sets of _bucket/_sum"
            );
            for (labels, series) in &buckets {
                let mut want: Vec<String> = def.buckets.iter().map(|b| format_value(*b)).collect();
                want.push("+Inf".into());
                let got: Vec<String> = series.iter().map(|(le, _)| le.clone()).collect();
                assert_eq!(got, want, "{name}{labels:?} boundaries");
                assert_eq!(got.iter().filter(|le| *le == "+Inf").count(), 1);
                assert!(
                    series.windows(2).all(|w| w[0].1 <= w[1].1),
                    "{name} not cumulative"
                );
                let inf = series.last().map(|(_, v)| *v);
                assert_eq!(
                    inf,
                    counts.get(labels).copied(),
                    "{name}{labels:?}: +Inf != _count"
                );
            }
        }
    }

    /// Labels sorted by key in every sample (with `le` last on buckets).
    fn check_label_order(parsed: &[(String, ParsedFamily)]) {
        for (_, fam) in parsed {
            for (name, labels, _) in &fam.samples {
                let keys: Vec<&str> = labels
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .filter(|k| !(name.ends_with("_bucket") && *k == "le"))
                    .collect();
                assert!(
                    keys.windows(2).all(|w| w[0] < w[1]),
                    "{name}: keys {keys:?} unsorted"
                );
            }
        }
    }

    fn check_all(text: &str) -> Vec<(String, ParsedFamily)> {
        assert!(!text.contains("Infinity"), "Infinity in output");
        let parsed = families(text);
        let order: Vec<&str> = parsed.iter().map(|(n, _)| n.as_str()).collect();
        let catalog: Vec<&str> = CATALOG.iter().map(|d| d.name).collect();
        assert_eq!(order, catalog, "every catalog family, sorted by name");
        for def in CATALOG {
            let fam = family(&parsed, def.name);
            assert_eq!(fam.kind, def.kind.as_str(), "{} TYPE", def.name);
            assert_eq!(fam.help.as_deref(), def.help, "{} HELP", def.name);
            assert!(!fam.samples.is_empty(), "{} renders no samples", def.name);
            if def.kind == Kind::Counter {
                assert!(
                    fam.samples
                        .iter()
                        .all(|(_, _, v)| v.is_finite() && *v >= 0.0)
                );
            }
        }
        check_histograms(&parsed);
        check_label_order(&parsed);
        parsed
    }

    #[test]
    fn catalog_is_sorted_unique_and_well_formed() {
        assert!(
            CATALOG.windows(2).all(|w| w[0].name < w[1].name),
            "sorted and unique"
        );
        assert_eq!(CATALOG.len(), 42);
        for def in CATALOG {
            assert!(valid_metric_name(def.name), "{}", def.name);
            assert_eq!(lookup(def.name), Some(def));
            match def.kind {
                Kind::Histogram => {
                    assert!(!def.buckets.is_empty(), "{} needs boundaries", def.name);
                    assert!(def.buckets.windows(2).all(|w| w[0] < w[1]));
                    assert!(def.buckets.iter().all(|b| b.is_finite()));
                }
                _ => assert!(def.buckets.is_empty()),
            }
        }
        // The 18 gateway catalog metrics of upstream and slow_consumer_disconnects_total carry
        // HELP; nothing else does (as upstream).
        let with_help: Vec<&str> = CATALOG
            .iter()
            .filter(|d| d.help.is_some())
            .map(|d| d.name)
            .collect();
        assert_eq!(with_help.len(), 19);
        assert!(with_help.iter().all(|n| n.starts_with("smithers_gateway_")));
        assert_eq!(lookup("smithers_gateway_nope"), None);
    }

    #[test]
    fn boundaries_follow_the_spec() {
        let pow = |base: f64, n: u32| (0..n).map(|k| base * 2f64.powi(k as i32)).collect();
        let want: Vec<f64> = pow(100.0, 11);
        assert_eq!(
            lookup(names::RPC_DURATION_MS).map(|d| d.buckets.to_vec()),
            Some(want)
        );
        let want: Vec<f64> = pow(100.0, 15);
        assert_eq!(
            lookup(names::DEVTOOLS_EVENT_BYTES).map(|d| d.buckets.to_vec()),
            Some(want)
        );
        for name in [
            names::DEVTOOLS_SNAPSHOT_BUILD_MS,
            names::DEVTOOLS_DELTA_BUILD_MS,
        ] {
            let want: Vec<f64> = pow(1.0, 11);
            assert_eq!(lookup(name).map(|d| d.buckets.to_vec()), Some(want));
        }
        assert_eq!(RPC_DURATION_BUCKETS.last(), Some(&102_400.0));
        assert_eq!(SIZE_BUCKETS.last(), Some(&1_638_400.0));
    }

    #[test]
    fn empty_registry_renders_every_family_with_zeros() {
        let text = Metrics::new().render();
        let parsed = check_all(&text);
        assert!(text.contains("\nsmithers_gateway_heartbeat_ticks_total 0\n"));
        assert!(text.contains("\nsmithers_gateway_connections_active 0\n"));
        assert!(text.contains("# HELP smithers_gateway_rpc_calls_total Gateway RPC calls\n"));
        assert!(text.starts_with("# TYPE smithers_devtools_active_subscribers gauge\n"));
        // Zero histograms have no labels but `le`, including the node-diff ones.
        for name in [
            names::NODE_DIFF_COMPUTE_MS,
            names::NODE_DIFF_BYTES,
            names::RPC_DURATION_MS,
        ] {
            let fam = family(&parsed, name);
            for (sample_name, labels, value) in &fam.samples {
                assert_eq!(*value, 0.0, "{sample_name}");
                assert!(
                    labels.iter().all(|(k, _)| k == "le"),
                    "{sample_name}{labels:?}"
                );
            }
        }
        assert!(text.contains("smithers_node_diff_bytes_bucket{le=\"+Inf\"} 0\n"));
        assert!(text.contains("smithers_node_diff_bytes_count 0\n"));
    }

    #[test]
    fn recorded_samples_render_and_parse() {
        let m = Metrics::new();
        let ws = [("transport", "ws")];
        m.connection_opened("ws");
        m.inc(
            names::MESSAGES_RECEIVED_TOTAL,
            &[("transport", "http"), ("frameType", "request")],
        );
        m.add(
            names::MESSAGES_RECEIVED_TOTAL,
            &[("frameType", "request"), ("transport", "http")],
            2.0,
        );
        m.inc(
            names::ERRORS_TOTAL,
            &[("kind", "socket"), ("transport", "ws")],
        );
        m.inc(
            names::ERRORS_TOTAL,
            &[
                ("transport", "http"),
                ("method", "runs.get"),
                ("kind", "rpc"),
                ("code", "NOT_FOUND"),
            ],
        );
        m.rpc_call("runs.list", "http", Duration::from_millis(150));
        m.observe(
            names::RPC_DURATION_MS,
            &[("method", "runs.list"), ("transport", "http")],
            0.5,
        );
        m.observe(
            names::RPC_DURATION_MS,
            &[("method", "health"), ("transport", "ws")],
            1e9,
        );
        m.observe(names::NODE_DIFF_COMPUTE_MS, &[], 3.0);
        m.observe(names::NODE_DIFF_BYTES, &[], 4096.0);
        m.set_gauge(names::NODE_DIFF_CACHE_ROWS, &[], 12.0);
        m.inc(names::HEARTBEAT_TICKS_TOTAL, &[]);
        let parsed = check_all(&m.render());

        assert_eq!(sample(&parsed, names::CONNECTIONS_TOTAL, &ws), 1.0);
        assert_eq!(sample(&parsed, names::CONNECTIONS_ACTIVE, &ws), 1.0);
        let received = [("frameType", "request"), ("transport", "http")];
        assert_eq!(
            sample(&parsed, names::MESSAGES_RECEIVED_TOTAL, &received),
            3.0
        );
        assert_eq!(
            family(&parsed, names::ERRORS_TOTAL).samples.len(),
            2,
            "two label sets"
        );
        // A family with samples has no bare zero line.
        assert!(
            family(&parsed, names::ERRORS_TOTAL)
                .samples
                .iter()
                .all(|(_, l, _)| !l.is_empty())
        );

        let rl = [("method", "runs.list"), ("transport", "http")];
        let bucket = |le: &str| {
            let labels = [rl[0], rl[1], ("le", le)];
            sample(&parsed, "smithers_gateway_rpc_duration_ms_bucket", &labels)
        };
        assert_eq!(bucket("100"), 1.0);
        assert_eq!(bucket("200"), 2.0);
        assert_eq!(bucket("+Inf"), 2.0);
        assert_eq!(
            sample(&parsed, "smithers_gateway_rpc_duration_ms_count", &rl),
            2.0
        );
        assert_eq!(
            sample(&parsed, "smithers_gateway_rpc_duration_ms_sum", &rl),
            150.5
        );
        let big = [("method", "health"), ("transport", "ws"), ("le", "102400")];
        assert_eq!(
            sample(&parsed, "smithers_gateway_rpc_duration_ms_bucket", &big),
            0.0
        );
        let big = [("method", "health"), ("transport", "ws"), ("le", "+Inf")];
        assert_eq!(
            sample(&parsed, "smithers_gateway_rpc_duration_ms_bucket", &big),
            1.0
        );
        let le4 = [("le", "4")];
        assert_eq!(
            sample(&parsed, "smithers_node_diff_compute_ms_bucket", &le4),
            1.0
        );
        assert_eq!(sample(&parsed, "smithers_node_diff_bytes_sum", &[]), 4096.0);
        assert_eq!(sample(&parsed, names::NODE_DIFF_CACHE_ROWS, &[]), 12.0);
        assert_eq!(
            m.histogram_totals(names::RPC_DURATION_MS, &rl),
            Some((2, 150.5))
        );
    }

    #[test]
    fn boundary_values_fall_in_their_own_bucket() {
        let m = Metrics::new();
        m.observe(names::DEVTOOLS_SNAPSHOT_BUILD_MS, &[], 2.0);
        m.observe(names::DEVTOOLS_SNAPSHOT_BUILD_MS, &[], 0.0);
        let parsed = check_all(&m.render());
        let bucket = |le| {
            sample(
                &parsed,
                "smithers_devtools_snapshot_build_ms_bucket",
                &[("le", le)],
            )
        };
        assert_eq!(bucket("1"), 1.0);
        assert_eq!(bucket("2"), 2.0);
    }

    #[test]
    fn label_values_are_escaped_and_keys_sorted() {
        let m = Metrics::new();
        let nasty = "a\\b\"c\nd}e,f=g";
        m.inc(
            names::WEBHOOKS_REJECTED_TOTAL,
            &[("workflow", nasty), ("reason", "invalid_payload")],
        );
        m.inc(
            names::RUNS_STARTED_TOTAL,
            &[("workflow", "w"), ("source", "cron"), ("resume", "false")],
        );
        let text = m.render();
        assert!(text.contains(
            "smithers_gateway_webhooks_rejected_total{reason=\"invalid_payload\",workflow=\"a\\\\b\\\"c\\nd}e,f=g\"} 1\n"
        ));
        assert!(text.contains(
            "smithers_gateway_runs_started_total{resume=\"false\",source=\"cron\",workflow=\"w\"} 1\n"
        ));
        let parsed = check_all(&text);
        let labels = [("reason", "invalid_payload"), ("workflow", nasty)];
        assert_eq!(
            sample(&parsed, names::WEBHOOKS_REJECTED_TOTAL, &labels),
            1.0
        );
    }

    #[test]
    fn odd_label_keys_and_long_values_are_tamed() {
        let m = Metrics::new();
        let long = "é".repeat(MAX_LABEL_VALUE_LEN);
        assert!(m.inc(
            names::SIGNALS_TOTAL,
            &[("out-come", "x"), ("9", &long), ("", "y")]
        ));
        // `le` on a histogram is reserved and dropped.
        assert!(m.observe(names::REWIND_FRAMES_DELETED, &[("le", "7")], 3.0));
        let parsed = check_all(&m.render());
        let fam = family(&parsed, names::SIGNALS_TOTAL);
        let (_, labels, _) = &fam.samples[0];
        let keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["_", "_9", "out_come"]);
        assert_eq!(labels[1].1.len(), MAX_LABEL_VALUE_LEN);
        assert_eq!(
            m.histogram_totals(names::REWIND_FRAMES_DELETED, &[]),
            Some((1, 3.0))
        );
    }

    #[test]
    fn misuse_is_ignored_not_fatal() {
        let m = Metrics::new();
        assert!(!m.inc("smithers_gateway_no_such_metric", &[]));
        assert!(!m.observe("", &[], 1.0));
        assert!(!m.inc(names::CONNECTIONS_ACTIVE, &[]), "inc on a gauge");
        assert!(
            !m.set_gauge(names::RPC_CALLS_TOTAL, &[], 1.0),
            "set on a counter"
        );
        assert!(
            !m.observe(names::RPC_CALLS_TOTAL, &[], 1.0),
            "observe on a counter"
        );
        assert!(
            !m.add(names::RPC_CALLS_TOTAL, &[], -1.0),
            "counters only go up"
        );
        assert!(!m.add(names::RPC_CALLS_TOTAL, &[], f64::NAN));
        assert!(!m.add(names::RPC_CALLS_TOTAL, &[], f64::INFINITY));
        assert!(!m.set_gauge(names::NODE_DIFF_CACHE_ROWS, &[], f64::NAN));
        assert!(!m.gauge_add(names::NODE_DIFF_CACHE_ROWS, &[], f64::NEG_INFINITY));
        assert!(!m.observe(names::RPC_DURATION_MS, &[], f64::NAN));
        assert_eq!(m.get("nope", &[]), None);
        assert_eq!(m.get(names::RPC_DURATION_MS, &[]), None);
        let text = m.render();
        check_all(&text);
        assert!(!text.contains("NaN") && !text.contains("-Inf"));
    }

    #[test]
    fn connections_active_is_a_real_count() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.connection_opened("ws");
        }
        m.connection_closed("ws", "close");
        m.connection_closed("ws", "error");
        m.connection_opened("ws");
        let parsed = check_all(&m.render());
        let ws = [("transport", "ws")];
        assert_eq!(sample(&parsed, names::CONNECTIONS_ACTIVE, &ws), 2.0);
        assert_eq!(sample(&parsed, names::CONNECTIONS_TOTAL, &ws), 4.0);
        let closed = [("reason", "close"), ("transport", "ws")];
        assert_eq!(
            sample(&parsed, names::CONNECTIONS_CLOSED_TOTAL, &closed),
            1.0
        );
        assert_eq!(m.get(names::CONNECTIONS_ACTIVE, &ws), Some(2.0));
        m.set_gauge(names::DEVTOOLS_ACTIVE_SUBSCRIBERS, &[("runId", "abc")], 5.0);
        m.gauge_add(
            names::DEVTOOLS_ACTIVE_SUBSCRIBERS,
            &[("runId", "abc")],
            -5.0,
        );
        assert_eq!(
            m.get(names::DEVTOOLS_ACTIVE_SUBSCRIBERS, &[("runId", "abc")]),
            Some(0.0)
        );
        assert!(m.remove(names::DEVTOOLS_ACTIVE_SUBSCRIBERS, &[("runId", "abc")]));
        assert!(!m.remove(names::DEVTOOLS_ACTIVE_SUBSCRIBERS, &[("runId", "abc")]));
        assert!(
            m.render()
                .contains("\nsmithers_devtools_active_subscribers 0\n")
        );
    }

    #[test]
    fn concurrent_increments_add_up() {
        let m = Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        m.inc(
                            names::RPC_CALLS_TOTAL,
                            &[("method", "health"), ("transport", "ws")],
                        );
                        m.connection_opened("ws");
                        m.connection_closed("ws", "close");
                        m.observe(names::DEVTOOLS_EVENT_BYTES, &[], f64::from(t * 1000 + i));
                        if i % 1000 == 0 {
                            let _ = m.render();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("worker thread");
        }
        let parsed = check_all(&m.render());
        let labels = [("method", "health"), ("transport", "ws")];
        assert_eq!(sample(&parsed, names::RPC_CALLS_TOTAL, &labels), 20_000.0);
        assert_eq!(
            sample(&parsed, names::CONNECTIONS_ACTIVE, &[("transport", "ws")]),
            0.0
        );
        assert_eq!(
            sample(&parsed, "smithers_devtools_event_bytes_count", &[]),
            20_000.0
        );
    }

    #[test]
    fn series_per_family_are_capped() {
        let m = Metrics::new();
        for i in 0..MAX_SERIES_PER_FAMILY {
            assert!(m.inc(
                names::WEBHOOKS_RECEIVED_TOTAL,
                &[("workflow", &i.to_string())]
            ));
        }
        assert!(!m.inc(names::WEBHOOKS_RECEIVED_TOTAL, &[("workflow", "one-more")]));
        assert!(
            m.inc(names::WEBHOOKS_RECEIVED_TOTAL, &[("workflow", "0")]),
            "existing series"
        );
        assert_eq!(
            m.get(names::WEBHOOKS_RECEIVED_TOTAL, &[("workflow", "0")]),
            Some(2.0)
        );
        assert!(
            m.inc(names::WEBHOOKS_VERIFIED_TOTAL, &[("workflow", "x")]),
            "other families"
        );
    }

    #[test]
    fn numbers_are_formatted_for_prometheus() {
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(150.5), "150.5");
        assert_eq!(format_value(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(format_value(1e21), "1000000000000000000000");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        for v in [3.0, 150.5, 1e-7, 1e21, -2.5] {
            assert_eq!(parse_value(&format_value(v)), Ok(v));
        }
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
        assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    }

    #[test]
    fn parser_rejects_malformed_lines() {
        for bad in [
            "name{k=\"v\"}",
            "name{k=\"v} 1",
            "name{k=\"a\\x\"} 1",
            "name{1k=\"v\"} 1",
            "9name 1",
            "name Infinity",
            "# TYPE name thing",
            "# comment",
            "name 1 123",
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?} should not parse");
        }
        assert_eq!(
            parse_line("a_b{x=\"1\",y=\"q\\\"\"} +Inf"),
            Ok(Line::Sample {
                name: "a_b".into(),
                labels: vec![("x".into(), "1".into()), ("y".into(), "q\"".into())],
                value: f64::INFINITY,
            })
        );
    }
}
