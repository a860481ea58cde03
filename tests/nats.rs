//! The NATS JetStream sink (cargo feature `nats`) against a real `nats-server -js` started on a
//! loopback port (`scripts/test.sh` installs it): every forward lands in the stream exactly
//! once, by its `Nats-Msg-Id`, across server restarts in the middle of the uplink's batches.

#![cfg(feature = "nats")]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

/// A `nats-server -js` on a loopback port, its store in its own dir.
struct Server {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Server {
    fn start() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Server {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        s.run();
        s
    }

    fn run(&mut self) {
        let bin = ["/usr/bin/nats-server", "/usr/sbin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("nats-server is installed (scripts/test.sh installs it)");
        let child = Command::new(bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server did not listen on {}", self.port);
    }

    /// Freezes it (SIGSTOP): connections stay open, nothing is answered.
    fn pause(&self) {
        self.signal("-STOP");
    }

    fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Stops it (SIGTERM) and waits.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every message in the stream, as its `Nats-Msg-Id`, in stream order.
async fn stream_ids(port: u16) -> Vec<String> {
    let client = async_nats::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("TIDEPOOL").await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut ids = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        ids.push(m.headers.get("Nats-Msg-Id").unwrap().to_string());
    }
    assert_eq!(ids.len() as u64, state.messages);
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forward_lands_in_the_stream_once_when_pubacks_are_lost_and_the_server_restarts() {
    let mut server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(&format!(
        "{}[uplink]\nsink = \"nats\"\nurl = \"nats://127.0.0.1:{}\"\ntimeout_ms = 1000\n[uplink.nats]\nstream = \"TIDEPOOL\"\nduplicate_window_s = 600\n[outbox]\nmax_delay_ms = 20\nlinger_ms = 200\nretry_base_ms = 50\nretry_max_ms = 400\n",
        wat_handler(dir.path(), "fwd", include_str!("handlers/forwarder.wat"), ""),
        server.port
    ));
    let dev = gw.connect("dev-n").await;
    let mut s = dev.open().await.unwrap();
    let mut seq = 0;
    let mut burst = async |s: &mut tidepool::client::FrameStream| {
        for _ in 0..300 {
            seq += 1;
            s.push(&publish(seq, "devices/dev-n/t", b"x"));
        }
        s.flush().await.unwrap();
        until_ack(s, seq).await;
    };
    burst(&mut s).await;
    // Frozen under a batch: its publishes sit in the server's socket, no PubAck comes, the
    // uplink times out and sends the batch again and again; thawed, the server stores the
    // first copies, then the retries, which it must drop as duplicates of their ids.
    server.pause();
    burst(&mut s).await;
    gw.wait_log("uplink failed", 2, Duration::from_secs(20))
        .await;
    server.resume();
    // And a restart between batches.
    gw.wait_outbox_empty(Duration::from_secs(30)).await;
    server.stop();
    server.run();
    burst(&mut s).await;
    gw.wait_outbox_empty(Duration::from_secs(30)).await;
    dev.close().await;
    let m = gw.stop();
    let ids = stream_ids(server.port).await;
    let distinct: BTreeSet<&String> = ids.iter().collect();
    let seq = 900;
    let want: BTreeSet<String> = (1..=seq)
        .map(|s| format!("gw-test:dev-n:{s}:fwd:0"))
        .collect();
    assert_eq!(
        distinct.len(),
        want.len(),
        "every forward is in the stream (missing e.g. {:?})",
        want.iter()
            .filter(|w| !distinct.contains(w))
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(ids.len(), distinct.len(), "no duplicate in the stream");
    assert!(m["send_failures"].as_u64().unwrap() >= 2, "{m}");
    assert!(
        gw.stderr.lock().unwrap().contains("dropped as duplicates"),
        "the retries met copies the stream already held"
    );
    eprintln!(
        "nats: {seq} forwards, {} in the stream, metrics {m}",
        ids.len()
    );
}
