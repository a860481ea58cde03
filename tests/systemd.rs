//! The gateway under systemd, with a real notify socket standing in for systemd's: `READY=1`
//! once it listens, `WATCHDOG=1` every half `WATCHDOG_USEC` while healthy and withheld while
//! the dispatcher's thread is stuck (a handler call longer than that), `STOPPING=1` on
//! SIGTERM; and `tidepool health`.

mod support;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// What the gateway told "systemd", with when.
type Heard = Arc<Mutex<Vec<(Instant, String)>>>;

fn listen(path: &std::path::Path) -> Heard {
    let sock = UnixDatagram::bind(path).unwrap();
    let heard: Heard = Arc::default();
    let h = heard.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            h.lock().unwrap().push((Instant::now(), msg));
        }
    });
    heard
}

/// Waits until `count` messages containing `what` were heard; returns when the last came.
async fn heard(h: &Heard, what: &str, count: usize) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let times: Vec<Instant> = h
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.contains(what))
            .map(|(t, _)| *t)
            .collect();
        if times.len() >= count {
            return times[count - 1];
        }
        assert!(
            Instant::now() < deadline,
            "{what} heard {} times",
            times.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pings heard between `from` and `to`.
fn pings(h: &Heard, from: Instant, to: Instant) -> Vec<Instant> {
    h.lock()
        .unwrap()
        .iter()
        .filter(|(t, m)| m.contains("WATCHDOG=1") && *t >= from && *t <= to)
        .map(|(t, _)| *t)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_then_pings_only_while_healthy_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("notify.sock");
    let h = listen(&socket);
    // Pings every 100 ms; a long call (about a second each, debug build) holds the
    // dispatcher's thread longer than that.
    let mut gw = Gateway::start_with_env(
        &long_handler_for_d1(dir.path()),
        &[
            ("NOTIFY_SOCKET", socket.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let ready = heard(&h, "READY=1", 1).await;
    let ready_msg = h.lock().unwrap()[0].1.clone();
    assert!(
        ready_msg.contains("STATUS=listening on 127.0.0.1:"),
        "{ready_msg}"
    );
    // Healthy and idle: pinged every quarter period.
    let third = heard(&h, "WATCHDOG=1", 3).await;
    assert!(pings(&h, ready, third).len() >= 3);
    let health = cli(&["health"], &gw.config);
    assert!(
        health.ok && health.stdout.trim() == "healthy",
        "{}",
        health.stdout
    );

    // Three long calls back to back: the dispatcher's thread does not answer within half a
    // period while one runs, and the pings stop for that long.
    let (d1, s1) = queue_long_calls(&gw, 3).await;
    let first_tick = Instant::now();
    gw.wait_log("tick", 3, Duration::from_secs(120)).await;
    let last_tick = Instant::now();
    let during = pings(&h, first_tick, last_tick);
    let mut gaps: Vec<Duration> = during.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.push(
        during
            .first()
            .map_or(last_tick - first_tick, |t| *t - first_tick),
    );
    let longest = gaps.iter().max().copied().unwrap_or_default();
    eprintln!(
        "pings while the calls ran: {} in {:?}, the longest gap {longest:?}",
        during.len(),
        last_tick - first_tick
    );
    assert!(
        longest >= Duration::from_millis(700),
        "pinged while the dispatcher was stuck: gaps {gaps:?}"
    );
    gw.wait_log(
        "unhealthy, watchdog pings withheld",
        1,
        Duration::from_secs(5),
    )
    .await;
    // Then healthy again: the pings resume.
    let before = h.lock().unwrap().len();
    heard(&h, "WATCHDOG=1", pings(&h, ready, Instant::now()).len() + 2).await;
    assert!(h.lock().unwrap().len() > before);
    drop((s1, d1));

    gw.stop();
    heard(&h, "STOPPING=1", 1).await;
}

#[test]
fn health_says_when_no_gateway_runs() {
    let dir = tempfile::tempdir().unwrap();
    let r = tidepool(&["health", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(r.code, Some(3), "{}", r.stderr);
}

/// Started as root with `gateway.user`, it binds its port first (here 700: only root may), then
/// runs as that user, owns its data dir, has core dumps off, and serves. (Skipped when the
/// tests do not run as root.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_as_root_it_binds_then_runs_as_gateway_user_without_core_dumps() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: not root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // `nobody` must reach the data dir.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let data = dir.path().join("data");
    // Core dumps allowed where it starts, so that their being off is the gateway's doing.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_CORE).unwrap();
    setrlimit(Resource::RLIMIT_CORE, hard.min(1 << 20), hard).unwrap();
    let mut gw =
        Gateway::start_in_with(&data, "user = \"nobody\"\nlisten = \"127.0.0.1:700\"\n", "");
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&data).unwrap().uid(), 65534);
    assert_eq!(std::fs::metadata(data.join("pki")).unwrap().uid(), 65534);
    assert!(gw.addr.ends_with(":700"), "{}", gw.addr);
    publish_one(&gw, 1).await;
    gw.stop();
}

/// A SIGHUP puts a changed `gateway.log` in force: debug lines stop once it says `info`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_log_levels() {
    let gw = Gateway::start("");
    let debug_lines = |gw: &Gateway| {
        gw.stderr
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.contains("device connected"))
            .count()
    };
    publish_one(&gw, 1).await;
    // Every later line comes after the first connection's (stderr is one ordered stream).
    gw.signal("-HUP");
    gw.wait_log("in force: acl.revoked", 1, Duration::from_secs(10))
        .await;
    assert_eq!(debug_lines(&gw), 1, "debug on at first");
    gw.edit_config("log = \"info,tidepool=debug\"", "log = \"info\"");
    gw.signal("-HUP");
    gw.wait_log(
        "reloaded gateway.log: `info,tidepool=debug` -> `info`",
        1,
        Duration::from_secs(10),
    )
    .await;
    publish_one(&gw, 2).await;
    gw.signal("-HUP");
    gw.wait_log("in force: acl.revoked", 3, Duration::from_secs(10))
        .await;
    assert_eq!(debug_lines(&gw), 1, "no debug line after the reload");
}

/// TCP sockets in LISTEN state that process `pid` holds (its fds against its net/tcp tables).
fn listening_tcp(pid: u32) -> usize {
    let mut listening = std::collections::HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" {
                listening.insert(f[9].to_string());
            }
        }
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .filter(|inode| listening.contains(inode))
        .count()
}

async fn get_metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    // Prometheus picks its parser by this: OpenMetrics, what the body is.
    assert!(
        out.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{out}"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_are_served_only_when_configured() {
    // Off by default: no TCP socket listens.
    let gw = Gateway::start("");
    assert_eq!(
        listening_tcp(gw.pid()),
        0,
        "no metrics endpoint unless configured"
    );
    drop(gw);

    let extra = format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\ninvoke_budget_ms = 0\n{}",
        handler_entry(&threshold_wasm(), &threshold_manifest())
    );
    let gw = Gateway::start(&extra);
    gw.wait_log("Prometheus metrics at http://", 1, Duration::from_secs(10))
        .await;
    let log = gw.stderr.lock().unwrap().clone();
    let addr = log
        .split("Prometheus metrics at http://")
        .nth(1)
        .and_then(|r| r.split("/metrics").next())
        .unwrap()
        .to_string();
    assert_eq!(listening_tcp(gw.pid()), 1);
    let dev = gw.connect("dev-1").await;
    let mut s = dev.open().await.unwrap();
    for seq in 1..=3 {
        s.send(&publish(seq, "devices/dev-1/temp", br#"{"v": 20}"#))
            .await
            .unwrap();
    }
    until_ack(&mut s, 3).await;
    let text = get_metrics(&addr).await;
    for line in [
        "tidepool_events_in_total 3",
        "tidepool_handler_invocations_total{handler=\"threshold\"} 3",
        // A budget of 0 ms: every invocation ran past it.
        "tidepool_handler_over_budget_total{handler=\"threshold\"} 3",
        "tidepool_connected_devices 1",
        "tidepool_clock_synced 1",
        "tidepool_build_info{",
    ] {
        assert!(text.contains(line), "no {line:?} in\n{text}");
    }
    dev.close().await;
}
