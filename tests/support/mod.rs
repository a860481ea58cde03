//! Test support: the real `tidepool` binary in a temp data dir, device certificates, a real
//! local HTTP server standing in for the cloud, and a tiny sled reader.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidepool::client::{Device, FrameStream};
use tidepool::proto::msg::{DeviceMsg, GatewayMsg, Publish};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

pub const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

/// The threshold example handler, built by `scripts/build-handlers.sh`.
pub fn threshold_wasm() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../modules/target/wasm32-unknown-unknown/release/threshold.wasm");
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-handlers.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn threshold_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../modules/examples/threshold/threshold.toml")
}

/// Writes a WAT handler and its manifest into `dir`; returns the `[[handler]]` TOML entry.
/// The manifest subscribes to `devices/+/#` unless `manifest_extra` sets `subscribe` (first).
pub fn wat_handler(dir: &Path, name: &str, wat: &str, manifest_extra: &str) -> String {
    let wasm = wat::parse_str(wat).expect("test WAT parses");
    let wp = dir.join(format!("{name}.wasm"));
    let mp = dir.join(format!("{name}.toml"));
    std::fs::write(&wp, wasm).unwrap();
    let subscribe = if manifest_extra.trim_start().starts_with("subscribe") {
        ""
    } else {
        "subscribe = [\"devices/+/#\"]\n"
    };
    std::fs::write(
        &mp,
        format!("name = \"{name}\"\nversion = 1\n{subscribe}{manifest_extra}\n"),
    )
    .unwrap();
    handler_entry(&wp, &mp)
}

pub fn handler_entry(wasm: &Path, manifest: &Path) -> String {
    format!(
        "[[handler]]\nwasm = \"{}\"\nmanifest = \"{}\"\n",
        wasm.display(),
        manifest.display()
    )
}

/// The demo's set-up as extra config: the example threshold handler, its crossings posted to
/// `cloud` (lingering 100 ms, retrying from 50 ms).
pub fn threshold_config(cloud: &Cloud) -> String {
    format!(
        "[uplink]\nurl = \"{}\"\n[outbox]\nlinger_ms = 100\nretry_base_ms = 50\nretry_max_ms = 200\n{}",
        cloud.url,
        handler_entry(&threshold_wasm(), &threshold_manifest())
    )
}

/// A handler that counts its invocations in state key `n` (u64 LE) and forwards nothing.
pub const COUNTER_WAT: &str = include_str!("../handlers/counter.wat");

/// Like [`COUNTER_WAT`], after burning fuel in a loop of `$spin` iterations (a slow handler).
pub fn slow_counter_wat(spin: u32) -> String {
    slowed(COUNTER_WAT, spin)
}

/// `wat` (the counter or the forwarder) after burning fuel in a loop of `spin` iterations.
pub fn slowed(wat: &str, spin: u32) -> String {
    wat.replace(
        "(i64.store (i32.const 16) (i64.const 0))",
        &format!(
            "(local $i i32) (local.set $i (i32.const {spin}))
    (block $done (loop $spin
      (br_if $done (i32.eqz (local.get $i)))
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (br $spin)))
    (i64.store (i32.const 16) (i64.const 0))"
        ),
    )
}

/// Iterations of the long handler's loop: about 8 fuel each, about a second a call in the
/// debug build here (more on a slower machine, which only makes the test harder to pass without
/// the fix).
pub const LONG_SPIN: u32 = 25_000_000;

/// The config of [`long_wat`] as `long`, for device `d1`'s events, with the fuel it needs (box
/// cap and manifest), its files in `dir`.
pub fn long_handler_for_d1(dir: &Path) -> String {
    let fuel = "[limits]\nfuel_per_event = 4000000000\n";
    let long = wat_handler(
        dir,
        "long",
        &long_wat(),
        &format!("subscribe = [\"devices/d1/#\"]\n{fuel}"),
    );
    format!("{fuel}{long}")
}

/// Device `d1` queues `calls` events for [`long_handler_for_d1`] back to back on one stream;
/// returns once the first call has run (logged `tick`), with the device and its stream (keep
/// both alive while the calls run).
pub async fn queue_long_calls(gw: &Gateway, calls: u64) -> (Device, FrameStream) {
    let d1 = gw.connect("d1").await;
    let mut s1 = d1.open().await.unwrap();
    for seq in 1..=calls {
        s1.push(&publish(seq, "devices/d1/x", b"1"));
    }
    s1.flush().await.unwrap();
    gw.wait_log("tick", 1, Duration::from_secs(120)).await;
    (d1, s1)
}

/// A handler whose every call runs long, within its fuel (legal), then logs `tick`.
pub fn long_wat() -> String {
    format!(
        r#"(module
  (import "tidepool" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "tick")
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
    (local $i i32) (local.set $i (i32.const {LONG_SPIN}))
    (block $done (loop $spin
      (br_if $done (i32.eqz (local.get $i)))
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (br $spin)))
    (call $log (i32.const 2) (i32.const 0) (i32.const 4))
    (i32.const 0)))"#
    )
}

/// A running gateway (the real binary) with its own data dir.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    data_dir: PathBuf,
    pub config: PathBuf,
    pub addr: String,
    child: Option<Child>,
    /// Environment variables the process starts with (restarts included).
    env: Vec<(String, String)>,
    /// The command that runs the gateway: the binary under test, or an emulator and a
    /// board's binary (restarts included).
    program: Vec<std::ffi::OsString>,
    pub stderr: Arc<Mutex<String>>,
    /// Woken after each line the gateway logs.
    logged: Arc<Notify>,
}

impl Gateway {
    /// Starts `tidepool run` with `extra` TOML appended to a test config (port 0, temp data dir).
    pub fn start(extra: &str) -> Gateway {
        Gateway::start_as("id = \"gw-test\"\n", extra)
    }

    /// Like [`Gateway::start`], with `gateway.id = id`.
    pub fn start_named(id: &str, extra: &str) -> Gateway {
        Gateway::start_as(&format!("id = \"{id}\"\n"), extra)
    }

    /// Like [`Gateway::start`], with no `gateway.id` (the default id).
    pub fn start_without_id(extra: &str) -> Gateway {
        Gateway::start_as("", extra)
    }

    /// Like [`Gateway::start`], with the data dir at `data_dir` (the config stays in a temp dir).
    pub fn start_in(data_dir: &Path, extra: &str) -> Gateway {
        Gateway::start_at("id = \"gw-test\"\n", Some(data_dir), extra, &[])
    }

    fn start_as(id_line: &str, extra: &str) -> Gateway {
        Gateway::start_at(id_line, None, extra, &[])
    }

    /// Like [`Gateway::start`], run by `program` (e.g. `qemu-aarch64-static` and a board's
    /// binary) instead of the binary under test.
    pub fn start_program(program: &[&std::ffi::OsStr], extra: &str) -> Gateway {
        let mut g = Gateway::prepare("id = \"gw-test\"\n", None, extra, &[]);
        g.program = program.iter().map(|p| p.to_os_string()).collect();
        g.spawn();
        g
    }

    /// Like [`Gateway::start_in`], with these lines in `[gateway]` (they may set `listen`).
    pub fn start_in_with(data_dir: &Path, gateway_lines: &str, extra: &str) -> Gateway {
        let lines = format!("id = \"gw-test\"\n{gateway_lines}");
        Gateway::start_at(&lines, Some(data_dir), extra, &[])
    }

    /// The gateway process's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Like [`Gateway::start_in`], with these environment variables set for the process.
    pub fn start_in_env(data_dir: &Path, extra: &str, env: &[(&str, &str)]) -> Gateway {
        Gateway::start_at("id = \"gw-test\"\n", Some(data_dir), extra, env)
    }

    /// Like [`Gateway::start`], with these environment variables set for the process.
    pub fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Gateway {
        Gateway::start_at("id = \"gw-test\"\n", None, extra, env)
    }

    fn start_at(
        id_line: &str,
        data_dir: Option<&Path>,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Gateway {
        let mut g = Gateway::prepare(id_line, data_dir, extra, env);
        g.spawn();
        g
    }

    fn prepare(
        id_line: &str,
        data_dir: Option<&Path>,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tidepool.toml");
        let data_dir = data_dir.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
        // `id_line` may set `listen` itself (then the default one is left out).
        let listen = match id_line.contains("listen =") {
            true => "",
            false => "listen = \"127.0.0.1:0\"\n",
        };
        let base = format!(
            "[gateway]\n{id_line}{listen}data_dir = \"{}\"\nlog = \"info,tidepool=debug\"\n",
            data_dir.display()
        );
        std::fs::write(&config, format!("{base}{extra}")).unwrap();
        Gateway {
            dir,
            data_dir,
            config,
            addr: String::new(),
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            stderr: Arc::default(),
            logged: Arc::default(),
            program: vec![BIN.into()],
        }
    }

    fn spawn(&mut self) {
        let mut child = Command::new(&self.program[0])
            .args(&self.program[1..])
            .args(["run", "--config"])
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tidepool");
        let stderr = child.stderr.take().unwrap();
        let (log, logged) = (self.stderr.clone(), self.logged.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&(line + "\n"));
                logged.notify_waiters();
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let Some(addr) = line.trim().strip_prefix("tidepool listening on ") else {
            let _ = child.wait();
            panic!(
                "gateway did not start: {line:?}\n{}",
                self.stderr.lock().unwrap()
            );
        };
        self.addr = addr.to_string();
        self.child = Some(child);
    }

    pub fn data(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// Issues a device certificate; returns (cert, key, ca).
    pub fn device_certs(&self, id: &str) -> (PathBuf, PathBuf, PathBuf) {
        let out = self.dir.path().join("certs");
        let [c, k, ca] = tidepool::pki::issue_device(&self.data(), id, &out).unwrap();
        (c, k, ca)
    }

    /// A client certificate signed by this gateway's own device CA, shaped by `shape` (its
    /// names, validity, …; it starts as a client-auth certificate with no name), written into
    /// `dir` as `NAME.crt` and `NAME.key`; returns (cert, key, server CA), as `device_certs`.
    pub fn odd_device_cert(
        &self,
        dir: &Path,
        name: &str,
        shape: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> (PathBuf, PathBuf, PathBuf) {
        self.odd_cert("device-ca", dir, name, shape)
    }

    /// As [`Gateway::odd_device_cert`], from the CA `ca` of the gateway's PKI
    /// (`operator-ca`, …).
    pub fn odd_cert(
        &self,
        ca: &str,
        dir: &Path,
        name: &str,
        shape: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> (PathBuf, PathBuf, PathBuf) {
        let pki = self.data().join("pki");
        let read = |f: &str| std::fs::read_to_string(pki.join(f)).unwrap();
        let ca_key = rcgen::KeyPair::from_pem(&read(&format!("{ca}.key"))).unwrap();
        let ca = rcgen::CertificateParams::from_ca_cert_pem(&read(&format!("{ca}.crt")))
            .unwrap()
            .self_signed(&ca_key)
            .unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        shape(&mut p);
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        let (crt, key_file) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (crt, key_file, pki.join("server-ca.crt"))
    }

    pub async fn connect(&self, id: &str) -> Device {
        let (c, k, ca) = self.device_certs(id);
        Device::connect(&self.addr, &ca, &c, &k)
            .await
            .expect("device connects")
    }

    /// Sends a signal (`-HUP`, …) to the running gateway.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Stops with SIGTERM (graceful) and returns the metrics it wrote.
    pub fn stop(&mut self) -> serde_json::Value {
        self.signal("-TERM");
        let mut child = self.child.take().expect("running");
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "gateway exited with {status}\n{}",
            self.stderr.lock().unwrap()
        );
        let m = std::fs::read(self.data().join("metrics.json")).unwrap();
        serde_json::from_slice(&m).unwrap()
    }

    /// Waits until the gateway's log (since it started) has `count` lines containing `pat`.
    pub async fn wait_log(&self, pat: &str, count: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.logged.notified();
            if self
                .stderr
                .lock()
                .unwrap()
                .lines()
                .filter(|l| l.contains(pat))
                .count()
                >= count
            {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "no {count} log lines with {pat:?} within {timeout:?}:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
        }
    }

    /// CPU time (user + system) the running gateway has used so far.
    pub fn cpu_time(&self) -> Duration {
        let pid = self.child.as_ref().expect("running").id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command name (which ends with the last ')'): utime and stime are
        // the 12th and 13th, in clock ticks (100 a second on Linux).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        Duration::from_millis((f[0] + f[1]) * 10)
    }

    /// The gateway's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap();
        kb * 1024
    }

    /// Waits for the gateway to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        child.wait().unwrap().code()
    }

    /// Waits (polling `tidepool status`, bounded) until the running gateway's outbox is empty:
    /// everything delivered and settled.
    pub async fn wait_outbox_empty(&self, timeout: Duration) {
        self.wait_outbox_entries(0, timeout).await
    }

    /// Waits (polling `tidepool status`, bounded) until the outbox holds `n` entries.
    pub async fn wait_outbox_entries(&self, n: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let st = cli(&["status", "--json"], &self.config);
            let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap_or_default();
            if v["outbox"]["entries"] == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the outbox did not come to {n} entries within {timeout:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The counter `name` now (`tidepool status`; 0 when the status does not answer).
    pub fn counter(&self, name: &str) -> u64 {
        let st = cli(&["status", "--json"], &self.config);
        let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap_or_default();
        v["metrics"][name].as_u64().unwrap_or(0)
    }

    /// Waits (polling `tidepool status`, bounded) until the counter `name` is at least `n`.
    pub async fn wait_counter(&self, name: &str, n: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let c = self.counter(name);
            if c >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} did not come to {n} within {timeout:?}: it is {c}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the gateway with SIGKILL (no drain, no flush) and waits for it to be gone.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Rewrites the config file: every line starting with `from` becomes `to`.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let edited: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with(from) {
                    to.to_string()
                } else {
                    l.to_string()
                }
            })
            .collect();
        assert_ne!(text.lines().count(), 0);
        std::fs::write(&self.config, edited.join("\n") + "\n").unwrap();
    }

    /// Stops the gateway if it runs, and starts it again on the same data dir.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.spawn();
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A client config on the device ALPN that trusts `ca` and offers no client certificate.
pub fn anonymous_client_config(ca: &Path) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in tidepool::pki::read_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"tidepool/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(crypto))
}

pub fn publish(seq: u64, topic: &str, payload: &[u8]) -> DeviceMsg {
    DeviceMsg::Publish(Publish {
        seq,
        topic: topic.into(),
        payload: payload.to_vec().into(),
        ts: None,
        id: None,
        src: None,
        class: None,
    })
}

/// Reads answers until an ack for `seq` (or higher), collecting everything seen.
pub async fn until_ack(s: &mut FrameStream, seq: u64) -> Vec<GatewayMsg> {
    let mut seen = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("answer within 10 s")
            .expect("stream ok");
        let Some(m) = m else {
            panic!("stream ended before ack {seq}; saw {seen:?}")
        };
        let done = matches!(m, GatewayMsg::Ack { seq: a } if a >= seq);
        seen.push(m);
        if done {
            return seen;
        }
    }
}

/// Ends the device's side of a stream and reads the gateway's answers until it ends its side
/// too: after this, another stream of the device may publish.
pub async fn end_stream(mut s: FrameStream) -> Vec<GatewayMsg> {
    s.send.finish().unwrap();
    let mut rest = Vec::new();
    while let Some(m) = next_msg(&mut s).await {
        rest.push(m);
    }
    rest
}

pub async fn next_msg(s: &mut FrameStream) -> Option<GatewayMsg> {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("answer within 10 s")
        .expect("stream ok")
}

/// `tidepool status --json` of a running gateway: handler `name`'s entry and the counters.
pub fn handler_status(gw: &Gateway, name: &str) -> (serde_json::Value, serde_json::Value) {
    let run = cli(&["status", "--json"], &gw.config);
    assert!(run.ok, "{}", run.stderr);
    let st: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let handler = st["handlers"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["name"] == name))
        .unwrap_or_else(|| panic!("no handler `{name}` in {st}"))
        .clone();
    (handler, st["metrics"].clone())
}

/// Opens the gateway's store after it stopped and reads a handler's state value.
pub fn read_state(data: &Path, handler: &str, key: &[u8]) -> Option<Vec<u8>> {
    open_stopped(data).state_durable(handler, key).unwrap()
}

/// Opens a stopped gateway's store. sled releases its file lock from a background thread
/// after the previous `Db` (an earlier read here) is dropped, so a lock still held is
/// retried for up to 5 s; any other error fails at once.
pub fn open_stopped(data: &Path) -> tidepool::store::Store {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tidepool::store::Store::open(&data.join("db"), 1 << 20) {
            Ok(store) => return store,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("the stopped gateway's store does not open: {e}"),
        }
    }
}

/// One request the cloud received.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub status: u16,
    /// The number of events in the body (counted once, on arrival).
    pub events: usize,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A real HTTP/1.1 server on loopback that records requests and answers each with a status
/// chosen by the test.
pub struct Cloud {
    pub url: String,
    pub requests: Arc<Mutex<Vec<Request>>>,
    arrived: Arc<Notify>,
}

impl Cloud {
    /// A cloud that answers by request number.
    pub async fn start(status: impl Fn(usize) -> u16 + Send + Sync + 'static) -> Cloud {
        let n = std::sync::atomic::AtomicUsize::new(0);
        Cloud::start_with(move |_| status(n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)))
            .await
    }

    /// A cloud that answers by request content.
    pub async fn start_with(status: impl Fn(&Request) -> u16 + Send + Sync + 'static) -> Cloud {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Cloud::serve(listener, move |r| (status(r), Duration::ZERO))
    }

    /// A cloud on `listener` that answers each request with a status after a delay, both
    /// chosen by the test (a request is recorded when it arrives, its status when answered).
    pub fn serve(
        listener: tokio::net::TcpListener,
        answer: impl Fn(&Request) -> (u16, Duration) + Send + Sync + 'static,
    ) -> Cloud {
        Cloud::serve_over(listener, None, answer)
    }

    /// An HTTPS cloud at `https://127.0.0.1:PORT/ingest`, its certificate (for that address)
    /// issued by a new CA, valid from `not_before` (Unix seconds) for a year; the CA's PEM is
    /// written to `ca_file`. Answers by request content.
    pub async fn start_tls(
        ca_file: &Path,
        not_before: u64,
        status: impl Fn(&Request) -> u16 + Send + Sync + 'static,
    ) -> Cloud {
        let day = |s: u64| time::OffsetDateTime::from_unix_timestamp(s as i64).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.not_before = day(not_before);
        ca_params.not_after = day(not_before + 365 * 86_400);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(ca_file, ca.pem()).unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        leaf.not_before = day(not_before);
        leaf.not_after = day(not_before + 365 * 86_400);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &ca, &ca_key).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        Cloud::serve_over(listener, Some(acceptor), move |r| {
            (status(r), Duration::ZERO)
        })
    }

    fn serve_over(
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        answer: impl Fn(&Request) -> (u16, Duration) + Send + Sync + 'static,
    ) -> Cloud {
        let port = listener.local_addr().unwrap().port();
        let url = match tls {
            Some(_) => format!("https://127.0.0.1:{port}/ingest"),
            None => format!("http://127.0.0.1:{port}/ingest"),
        };
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let arrived = Arc::new(Notify::new());
        let status = Arc::new(answer);
        let (reqs, arr) = (requests.clone(), arrived.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (reqs, arr, status) = (reqs.clone(), arr.clone(), status.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        // A handshake the client gives up (a certificate it refuses) ends here.
                        Some(t) => {
                            if let Ok(s) = t.accept(sock).await {
                                answer_requests(s, reqs, arr, status).await
                            }
                        }
                        None => answer_requests(sock, reqs, arr, status).await,
                    }
                });
            }
        });
        Cloud {
            url,
            requests,
            arrived,
        }
    }

    /// Waits until `pred` holds for the requests so far, or `timeout` passes.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Request]) -> bool,
    ) -> Vec<Request> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            {
                let g = self.requests.lock().unwrap();
                if pred(&g) {
                    return g.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.requests.lock().unwrap().clone();
            }
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

/// Reads HTTP/1.1 requests from `stream` and answers each as `status` says, recording it.
async fn answer_requests<S>(
    stream: S,
    reqs: Arc<Mutex<Vec<Request>>>,
    arr: Arc<Notify>,
    status: Arc<impl Fn(&Request) -> (u16, Duration) + Send + Sync + 'static>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (r, mut w) = tokio::io::split(stream);
    let mut r = tokio::io::BufReader::new(r);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await.unwrap();
            let h = h.trim_end().to_string();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).await.unwrap();
        let events = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["events"].as_array().map(Vec::len))
            .unwrap_or(0);
        let mut req = Request {
            path,
            headers,
            body,
            status: 0,
            events,
        };
        let (code, delay) = status(&req);
        req.status = code;
        reqs.lock().unwrap().push(req);
        arr.notify_waiters();
        tokio::time::sleep(delay).await;
        let resp = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n");
        if w.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}

/// What one run of the CLI printed.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Runs `cmd` with the shell umask `umask` (the command's own, set before it starts).
    pub fn of_with_umask(cmd: &mut Command, umask: u32) -> Run {
        use std::os::unix::process::CommandExt;
        // SAFETY: umask is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask as _));
                Ok(())
            });
        }
        Run::of(cmd)
    }

    fn of(cmd: &mut Command) -> Run {
        let out = cmd.output().expect("run tidepool");
        Run {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Stdout as JSON lines.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

/// `tidepool ARGS`.
pub fn tidepool(args: &[&str]) -> Run {
    Run::of(Command::new(BIN).args(args))
}

/// `tidepool send` as device `(cert, key, ca)` to `addr`: one payload on `topic` (run off the
/// async runtime, which the gateway under test may share).
pub async fn send_cli(
    addr: &str,
    (cert, key, ca): (&Path, &Path, &Path),
    topic: &str,
    payload: &str,
) -> Run {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let args: Vec<String> = [
        "send",
        "--gateway",
        addr,
        "--cert",
        &s(cert),
        "--key",
        &s(key),
        "--ca",
        &s(ca),
        "--topic",
        topic,
        "--payload",
        payload,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    tokio::task::spawn_blocking(move || {
        tidepool(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap()
}

/// `tidepool ARGS --config CONFIG`.
pub fn cli(args: &[&str], config: &Path) -> Run {
    Run::of(Command::new(BIN).args(args).arg("--config").arg(config))
}

/// `tidepool invoke --handler WASM --manifest MANIFEST --events EVENTS EXTRA`.
pub fn invoke(wasm: &Path, manifest: &Path, events: &Path, extra: &[&str]) -> Run {
    Run::of(
        Command::new(BIN)
            .arg("invoke")
            .arg("--handler")
            .arg(wasm)
            .arg("--manifest")
            .arg(manifest)
            .arg("--events")
            .arg(events)
            .args(extra),
    )
}

/// Four unrouted `normal` forwards from one device, sent to the cloud as one batch; waits
/// until `done` holds for the cloud's requests, then stops the gateway and returns its metrics.
pub async fn four_forwards_in_one_batch(
    cloud: &Cloud,
    topics: [&str; 4],
    done: impl Fn(&[Request]) -> bool,
) -> serde_json::Value {
    four_forwards_then_one(cloud, topics, None, |_| true, done).await
}

/// Like [`four_forwards_in_one_batch`], and once `ready` holds, a fifth forward on `fifth`.
pub async fn four_forwards_then_one(
    cloud: &Cloud,
    topics: [&str; 4],
    fifth: Option<&str>,
    ready: impl Fn(&[Request]) -> bool,
    done: impl Fn(&[Request]) -> bool,
) -> serde_json::Value {
    let mut gw = Gateway::start(&format!(
        "[router]\nunrouted = \"forward\"\nunrouted_class = \"normal\"\n[outbox]\nmax_batch_events = 4\nmax_delay_ms = 600000\nretry_base_ms = 50\nretry_max_ms = 200\n[uplink]\nurl = \"{}\"\n",
        cloud.url
    ));
    let dev = gw.connect("dev-p").await;
    let mut s = dev.open().await.unwrap();
    for (i, t) in topics.iter().enumerate() {
        s.push(&publish(i as u64 + 1, &format!("devices/dev-p/{t}"), b"{}"));
    }
    s.flush().await.unwrap();
    until_ack(&mut s, 4).await;
    if let Some(t) = fifth {
        cloud.wait_until(Duration::from_secs(10), ready).await;
        s.send(&publish(5, &format!("devices/dev-p/{t}"), b"{}"))
            .await
            .unwrap();
        until_ack(&mut s, 5).await;
    }
    cloud.wait_until(Duration::from_secs(10), done).await;
    dev.close().await;
    gw.stop()
}

/// The event ids of every request the cloud answered 200.
pub fn delivered_ids(r: &[Request]) -> Vec<String> {
    r.iter()
        .filter(|r| r.status == 200)
        .flat_map(|r| {
            r.json()["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The number of events in a request's body.
pub fn events_in(r: &Request) -> usize {
    r.events
}

/// Makes a [`Daemon`]'s command line from its port and dir.
pub type DaemonCommand = Box<dyn Fn(u16, &Path) -> Command + Send>;

/// A server the tests run (Mosquitto, nats-server) on a free loopback port with a dir of its
/// own: `command(port, dir)` makes its command line; it is ready when it accepts TCP
/// connections. Stopped with SIGTERM (`stop`), frozen and thawed (`signal`), killed on drop.
pub struct Daemon {
    pub port: u16,
    pub dir: tempfile::TempDir,
    command: DaemonCommand,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(command: impl Fn(u16, &Path) -> Command + Send + 'static) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut d = Daemon {
            port,
            dir: tempfile::tempdir().unwrap(),
            command: Box::new(command),
            child: None,
        };
        d.run();
        d
    }

    /// Starts it (again, on the same port and dir) and waits until it listens (bounded).
    pub fn run(&mut self) {
        let mut cmd = (self.command)(self.port, self.dir.path());
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{cmd:?} did not listen on {}", self.port);
    }

    /// Stops it with SIGTERM (a clean shutdown) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Sends a signal (`-STOP` freezes it, `-CONT` thaws it).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A command running one of the repo's scripts (`scripts/NAME`), without what cargo test
/// adds to the environment (`CARGO_*`, `OUT_DIR`, the build script's `TIDEPOOL_BUILD_UNIX`:
/// a nested cargo would see them change and rebuild every time).
pub fn script(name: &str) -> Command {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(root.join("scripts").join(name));
    for (k, _) in std::env::vars_os() {
        let key = k.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || [
                "OUT_DIR",
                "TIDEPOOL_BUILD_UNIX",
                "LD_LIBRARY_PATH",
                "RUST_RECURSION_COUNT",
            ]
            .contains(&key.as_ref())
        {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// The first of `paths` that exists (a server installed by `scripts/test.sh`).
pub fn installed(name: &str, paths: &[&str]) -> PathBuf {
    paths
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} is not installed (scripts/test.sh installs it)"))
}

// Bundles: keys, signed counters, and the offline inbox, as an operator uses them.

/// Makes a key pair in `dir/keys`; returns the key file and the public key line.
pub fn keys(dir: &Path) -> (PathBuf, String) {
    let out = dir.join("keys");
    let run = tidepool(&["keys", "generate", "--out", out.to_str().unwrap()]);
    assert!(run.ok, "{}", run.stderr);
    let public = std::fs::read_to_string(out.join("signing.pub")).unwrap();
    (out.join("signing.key"), public.trim().to_string())
}

pub fn build(manifest: &Path, wasm: &Path, key: &Path, out: &Path) -> Run {
    build_with(manifest, Some(wasm), key, out)
}

/// `tidepool bundle build`, with no module for a config bundle.
pub fn build_with(manifest: &Path, wasm: Option<&Path>, key: &Path, out: &Path) -> Run {
    let mut args = vec!["bundle", "build", "--manifest", manifest.to_str().unwrap()];
    if let Some(w) = wasm {
        args.extend(["--wasm", w.to_str().unwrap()]);
    }
    args.extend([
        "--key",
        key.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    tidepool(&args)
}

/// Waits for `path` to exist (the inbox thread moves a bundle when it is done with it).
pub async fn appears(path: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Puts `bytes` in the gateway's inbox as an operator would (`NAME.part`, then a rename) and
/// returns what it became: `Ok(())` deployed, `Err(reason)` rejected.
pub async fn through_inbox(gw: &Gateway, name: &str, bytes: &[u8]) -> Result<(), String> {
    let inbox = gw.data().join("inbox");
    let part = inbox.join(format!("{name}.part"));
    std::fs::write(&part, bytes).unwrap();
    std::fs::rename(&part, inbox.join(name)).unwrap();
    let (done, rejected) = (
        inbox.join("done").join(name),
        inbox.join("rejected").join(name),
    );
    let reason = inbox.join("rejected").join(format!("{name}.reason"));
    let started = std::time::Instant::now();
    let deadline = started + std::time::Duration::from_secs(20);
    loop {
        if done.exists() {
            eprintln!("{name}: deployed {:?} after the rename", started.elapsed());
            return Ok(());
        }
        if rejected.exists() && reason.exists() {
            return Err(std::fs::read_to_string(&reason).unwrap());
        }
        assert!(std::time::Instant::now() < deadline, "{name} was not taken");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A counter handler counting in state key `key`, as manifest text and module bytes.
pub fn counter(name: &str, version: u64, key: &str, extra: &str) -> (String, Vec<u8>) {
    let wat = COUNTER_WAT.replace(
        "(data (i32.const 0) \"n\")",
        &format!("(data (i32.const 0) \"{key}\")"),
    );
    (
        format!("name = \"{name}\"\nversion = {version}\nsubscribe = [\"devices/#\"]\n{extra}"),
        wat::parse_str(&wat).unwrap(),
    )
}

/// Signs (manifest, module) with `key` through the CLI; returns the bundle's bytes.
pub fn signed(dir: &Path, (manifest, wasm): &(String, Vec<u8>), key: &Path) -> Vec<u8> {
    let (m, w, out) = (dir.join("m.toml"), dir.join("m.wasm"), dir.join("m.tpb"));
    std::fs::write(&m, manifest).unwrap();
    std::fs::write(&w, wasm).unwrap();
    let r = build(&m, &w, key, &out);
    assert!(r.ok, "{}", r.stderr);
    std::fs::read(out).unwrap()
}

pub async fn publish_one(gw: &Gateway, seq: u64) {
    let d = gw.connect("d1").await;
    let mut s = d.open().await.unwrap();
    s.send(&publish(seq, "devices/d1/x", b"1")).await.unwrap();
    until_ack(&mut s, seq).await;
    d.close().await;
}
