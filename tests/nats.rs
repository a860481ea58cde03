//! The NATS JetStream sink (cargo feature `nats`) against a real `nats-server -js` started on a
//! loopback port (`scripts/test.sh` installs it): every forward lands in the stream exactly
//! once, by its `Nats-Msg-Id`, across server restarts in the middle of the uplink's batches.

#![cfg(feature = "nats")]

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use support::*;

/// A `nats-server -js` on a loopback port, its store in its own dir.
fn server() -> Daemon {
    Daemon::start(|port, dir| {
        let mut cmd = Command::new(installed(
            "nats-server",
            &["/usr/bin/nats-server", "/usr/sbin/nats-server"],
        ));
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir);
        cmd
    })
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
    let mut server = server();
    // The stream holds a copy of the first forward before the gateway sends it: what a
    // PubAck lost after the message was stored leaves behind. The gateway's send must count
    // as delivered, and the stream must keep one copy.
    {
        let client = async_nats::connect(format!("127.0.0.1:{}", server.port))
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "TIDEPOOL".into(),
            subjects: vec!["tidepool.>".into()],
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "gw-test:dev-n:1:fwd:0");
        js.publish_with_headers("tidepool.gw-test.normal", headers, "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
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
    // uplink times out and sends the batch again; thawed, the server may store the first
    // copies too, and must then drop the retries as duplicates of their ids.
    server.signal("-STOP");
    burst(&mut s).await;
    // Two failed attempts (the log says only the first of an outage).
    let failed = gw.counter("send_failures");
    gw.wait_counter("send_failures", failed + 2, Duration::from_secs(20))
        .await;
    server.signal("-CONT");
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
        "the first forward met the copy the stream already held"
    );
    eprintln!(
        "nats: {seq} forwards, {} in the stream, metrics {m}",
        ids.len()
    );
}
