//! The Prometheus endpoint (`[metrics] listen`, off by default): `GET /metrics` answers the
//! OpenMetrics text format (1.0.0; Prometheus picks its parser by the content type), made by
//! `prometheus-client` from one snapshot of what
//! `status` reports (the counters, each handler's runs, the outbox, the disk, the clock) and a
//! few gauges beside it. Nothing runs between scrapes: no timer, no wake-up.

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One scrape's values.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// The `status` answer (`control::Control::status`).
    pub status: serde_json::Value,
    /// Devices connected now.
    pub connected: u64,
    /// Outbox entries per class, and the age of the oldest normal and bulk entry.
    pub outbox: [(&'static str, u64, Option<Duration>); 3],
    /// The store's size on disk.
    pub store_bytes: u64,
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType::{Counter, Gauge};
        use Sample::{Count, Value};
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let enc = &mut enc;
        for (name, help) in crate::metrics::Metrics::HELP {
            let v = n(&self.status["metrics"][*name]);
            one(enc, Counter, (&format!("tidepool_{name}"), help), Count(v))?;
        }
        // Each handler's runs, labelled by handler (no family at all without handlers).
        let handlers = self.status["handlers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let per_handler: [(&str, &str, &str, Option<f64>); 7] = [
            (
                "calls",
                "tidepool_handler_invocations",
                "Invocations of the handler.",
                None,
            ),
            (
                "errors",
                "tidepool_handler_failures",
                "Invocations that trapped or hit a limit.",
                None,
            ),
            (
                "timeouts",
                "tidepool_handler_fuel_timeouts",
                "Invocations stopped for running out of fuel.",
                None,
            ),
            (
                "fuel",
                "tidepool_handler_fuel",
                "Fuel the handler's invocations used.",
                None,
            ),
            (
                "busy_us",
                "tidepool_handler_busy_seconds",
                "Time the handler's invocations ran.",
                Some(1e-6),
            ),
            (
                "over_budget",
                "tidepool_handler_over_budget",
                "Invocations longer than metrics.invoke_budget_ms (negative uptime).",
                None,
            ),
            (
                "over_budget_us",
                "tidepool_handler_over_budget_seconds",
                "Time invocations ran past metrics.invoke_budget_ms (negative uptime).",
                Some(1e-6),
            ),
        ];
        let label =
            |h: &serde_json::Value| ("handler", h["name"].as_str().unwrap_or("?").to_string());
        if !handlers.is_empty() {
            for (key, name, help, scale) in per_handler {
                let samples = handlers.iter().map(|h| {
                    let v = n(&h["runs"][key]);
                    (label(h), scale.map_or(Count(v), |s| Value(v as f64 * s)))
                });
                family(enc, Counter, (name, help), samples)?;
            }
            let quarantined = handlers.iter().map(|h| {
                (
                    label(h),
                    Count(u64::from(h["quarantined"].as_bool() == Some(true))),
                )
            });
            let what = (
                "tidepool_handler_quarantined",
                "1 when the handler is quarantined for every device.",
            );
            family(enc, Gauge, what, quarantined)?;
        }
        let classes = self.outbox.iter();
        family(
            enc,
            Gauge,
            (
                "tidepool_outbox_entries",
                "Forwards waiting in the outbox, by class.",
            ),
            classes
                .clone()
                .map(|(class, count, _)| (("class", class.to_string()), Count(*count))),
        )?;
        family(
            enc,
            Gauge,
            (
                "tidepool_outbox_oldest_age_seconds",
                "Age of the oldest waiting forward, by class (0: none waits).",
            ),
            classes.map(|(class, _, age)| {
                (
                    ("class", class.to_string()),
                    Value(age.map_or(0.0, |d| d.as_secs_f64())),
                )
            }),
        )?;
        let st = &self.status;
        let flag = |b: bool| Count(u64::from(b));
        let gauges = [
            ("tidepool_outbox_bytes", "Bytes the outbox holds.", Count(n(&st["outbox"]["bytes"]))),
            ("tidepool_connected_devices", "Devices connected now.", Count(self.connected)),
            ("tidepool_store_bytes", "The store's size on disk.", Count(self.store_bytes)),
            ("tidepool_disk_free_bytes", "Free bytes on the data dir's disk.", Count(n(&st["disk"]["free_bytes"]))),
            (
                "tidepool_disk_low",
                "1 while free space is below store.min_free_bytes (publishes answered busy).",
                flag(st["disk"]["low"].as_bool() == Some(true)),
            ),
            (
                "tidepool_clock_synced",
                "0 while the wall clock is not set (before 2024 or behind the clock floor: no RTC, NTP not synced).",
                flag(st["clock"]["synced"].as_bool() != Some(false)),
            ),
            (
                "tidepool_clock_floor_seconds",
                "The clock floor (Unix seconds): certificates are checked at the later of it and the wall clock.",
                Count(n(&st["clock"]["floor_s"])),
            ),
            ("tidepool_uptime_seconds", "Seconds since the gateway started.", Value(n(&st["uptime_s"]) as f64)),
        ];
        for (name, help, v) in gauges {
            one(enc, Gauge, (name, help), v)?;
        }
        let info = prometheus_client::metrics::info::Info::new([
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("gateway", st["gateway"].as_str().unwrap_or("").to_string()),
        ]);
        info.encode(enc.encode_descriptor(
            "tidepool_build",
            "The build and the gateway id.",
            None,
            info.metric_type(),
        )?)
    }
}

/// A sample's value: a count prints as an integer, a value (seconds, a ratio) as a float.
#[derive(Debug, Clone, Copy)]
enum Sample {
    Count(u64),
    Value(f64),
}

impl Sample {
    fn encode(
        self,
        kind: prometheus_client::metrics::MetricType,
        enc: prometheus_client::encoding::MetricEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType::Counter;
        match (kind, self) {
            (Counter, Sample::Count(v)) => ConstCounter::new(v).encode(enc),
            (Counter, Sample::Value(v)) => ConstCounter::new(v).encode(enc),
            (_, Sample::Count(v)) => {
                ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(enc)
            }
            (_, Sample::Value(v)) => ConstGauge::new(v).encode(enc),
        }
    }
}

/// One metric without labels.
fn one(
    enc: &mut DescriptorEncoder,
    kind: prometheus_client::metrics::MetricType,
    (name, help): (&str, &str),
    v: Sample,
) -> Result<(), std::fmt::Error> {
    v.encode(kind, enc.encode_descriptor(name, help, None, kind)?)
}

/// A family with one label: one sample per (label, value).
fn family(
    enc: &mut DescriptorEncoder,
    kind: prometheus_client::metrics::MetricType,
    (name, help): (&str, &str),
    samples: impl Iterator<Item = ((&'static str, String), Sample)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, kind)?;
    for (label, v) in samples {
        v.encode(kind, family.encode_family(&[label])?)?;
    }
    Ok(())
}

/// The text exposition of one scrape.
pub fn render(scrape: Scrape) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    // Writing into a String cannot fail; the encoders return fmt::Result only for that case.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Serves `GET /metrics` on `listener` until `stop` turns true; `scrape` gathers each answer.
/// Each client is served on a task of its own (at most [`MAX_CLIENTS`] at once, others are
/// closed at once) and gets 2 s to send its request and 5 s to take the answer.
pub async fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    scrape: F,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Scrape> + Send,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let sock = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("metrics endpoint: {e}");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let request = tokio::time::timeout(Duration::from_secs(2), read_head(sock)).await;
            let Ok(Some((mut sock, line))) = request else {
                return;
            };
            let (status, body) = match line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                ["GET", "/metrics"] => ("200 OK", render(scrape().await)),
                ["GET", _] => ("404 Not Found", "only /metrics is here\n".to_string()),
                _ => ("405 Method Not Allowed", "GET /metrics\n".to_string()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {CONTENT_TYPE}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                sock.write_all(head.as_bytes()).await?;
                sock.write_all(body.as_bytes()).await?;
                sock.shutdown().await
            })
            .await;
        });
    }
}

/// Scrapes served at once.
pub const MAX_CLIENTS: usize = 4;

/// What `prometheus-client`'s text encoder writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reads a request's head (at most 8 KiB) and returns its first line.
async fn read_head(mut sock: tokio::net::TcpStream) -> Option<(tokio::net::TcpStream, String)> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > 8192 {
            return None;
        }
        let got = sock.read(&mut chunk).await.ok()?;
        if got == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..got]);
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next()?.to_string();
    Some((sock, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_renders_counters_handlers_gauges_and_build_info() {
        let status = serde_json::json!({
            "gateway": "gw-1",
            "uptime_s": 12,
            "metrics": {"events_in": 5, "handler_calls": 4},
            "handlers": [{"name": "threshold", "quarantined": false,
                          "runs": {"calls": 4, "errors": 1, "timeouts": 0, "fuel": 900,
                                   "busy_us": 1500, "over_budget": 1, "over_budget_us": 250}}],
            "outbox": {"bytes": 300},
            "disk": {"free_bytes": 1000, "low": false},
            "clock": {"synced": false, "floor_s": 1_800_000_000u64},
        });
        let text = render(Scrape {
            status,
            connected: 2,
            outbox: [
                ("urgent", 1, None),
                ("normal", 2, Some(Duration::from_secs(3))),
                ("bulk", 0, None),
            ],
            store_bytes: 4096,
        });
        for line in [
            "# TYPE tidepool_events_in counter",
            "tidepool_events_in_total 5",
            "tidepool_resends_total 0",
            "tidepool_handler_invocations_total{handler=\"threshold\"} 4",
            "tidepool_handler_calls_total 4",
            "tidepool_handler_busy_seconds_total{handler=\"threshold\"} 0.0015",
            "tidepool_handler_over_budget_seconds_total{handler=\"threshold\"} 0.00025",
            "tidepool_outbox_entries{class=\"normal\"} 2",
            "tidepool_outbox_oldest_age_seconds{class=\"normal\"} 3.0",
            "tidepool_connected_devices 2",
            "tidepool_store_bytes 4096",
            "tidepool_clock_synced 0",
            "tidepool_build_info{version=\"",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
