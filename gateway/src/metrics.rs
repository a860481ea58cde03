//! Counters of what the gateway did, shared by every task, written to
//! `<data-dir>/metrics.json` at shutdown and logged.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Monotonic counters since start.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(#[doc = $doc] pub $name: AtomicU64,)*
        }

        impl Metrics {
            /// A JSON object of every counter.
            pub fn snapshot(&self) -> serde_json::Value {
                let mut m = serde_json::Map::new();
                $(m.insert(stringify!($name).into(), self.$name.load(Ordering::Relaxed).into());)*
                serde_json::Value::Object(m)
            }

            /// Each counter's name and what it counts (the Prometheus HELP lines).
            pub const HELP: &'static [(&'static str, &'static str)] =
                &[$((stringify!($name), $doc),)*];
        }
    };
}

counters! {
    connections: "Device connections accepted.",
    admin_connections: "Operator connections accepted on the admin channel (ALPN tidepool-admin/1).",
    admin_refused: "Admin channel connections and requests refused: a source outside admin.allow_from, a certificate not from the operator CA, or an operator in admin.revoked.",
    admin_requests: "Requests answered on the admin channel and the local control socket.",
    connections_refused: "Connection attempts refused: ingress.max_connections devices connected, ingress.max_handshakes handshakes in flight, or ingress.max_handshakes_per_address from one address.",
    handshake_retries: "Connection attempts answered with a QUIC Retry (address validation, once a quarter of ingress.max_handshakes is in use).",
    handshakes_timed_out: "Handshakes given up after ingress.handshake_timeout_ms.",
    connections_revoked: "Connections closed with `revoked` (code 6): at connect, or at a reload of acl.revoked.",
    events_in: "Publishes received on streams (resends included).",
    bytes_in: "Bytes of frames and datagrams received from devices.",
    resends: "Publishes at or below the high-water mark, acked again without running.",
    nacks: "Publishes nacked.",
    busy: "Busy answers sent.",
    rate_limited: "Frames and datagrams of a device past ingress.device_events_per_s: publishes answered busy (also in busy), other frames answered after a pause, datagrams dropped (also in datagrams_dropped).",
    datagrams_in: "Telemetry datagrams received.",
    datagrams_dropped: "Datagrams shed (the commit backlog past ingress.datagram_shed_backlog, the dispatcher's inbox half full, or their device past its rate) or rejected.",
    handler_calls: "Handler invocations.",
    handler_errors: "Invocations that failed (their events are dead-lettered).",
    handler_timeouts: "Invocations stopped for running out of fuel (among handler_errors).",
    dead_letters: "Dead letters written.",
    dead_letters_dropped: "Oldest dead letters dropped to keep the tree under store.dead_letter_max_bytes.",
    handlers_quarantined: "Handlers quarantined for every device (failures in a row from limits.quarantine_devices devices).",
    handler_cpu_refusals: "Invocations refused because the handler was over its share of the wall clock (limits.cpu_percent).",
    handler_device_quarantines: "Handlers quarantined for one device (that device's events failed them quarantine_after_errors times in a row).",
    timer_calls: "Timer invocations (tp_on_timer).",
    log_bytes_dropped: "Handler log bytes dropped over limits.log_bytes_per_event.",
    recorded: "Events queued for the recording.",
    record_dropped: "Events not recorded because the recording's writer was behind.",
    timers_skipped: "Timer firings skipped because the outbox was full.",
    forwards: "Forwards admitted to the outbox.",
    bulk_dropped: "Bulk forwards dropped at admission because the outbox was full.",
    unrouted: "Events no handler subscribes to.",
    groups: "Group commits (one atomic write, one flush and one fdatasync each).",
    store_syncs: "Writes made durable (flush + fdatasync): group commits and uplink settles.",
    outbox_corrupt: "Outbox entries that did not decode at start, moved to the dead letters.",
    uplink_outages: "Times only refused entries were left to send with nothing accepted since they were refused: backed off and retried, not dead-lettered.",
    uplink_wakeups: "Times the uplink woke up (its first send after sleeping).",
    uplink_awake_ms: "Milliseconds the uplink was awake: from waking up to closing after its linger.",
    uplink_over_budget_bytes: "Bytes sent past uplink.budget_bytes_per_day (only urgent forwards go then).",
    batches_sent: "Batches the cloud accepted.",
    events_sent: "Outbox entries the cloud accepted.",
    bytes_up: "Request body bytes sent to the cloud (retries included).",
    send_failures: "Uplink attempts that failed and will be retried.",
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds one and returns the new count.
    pub fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}
