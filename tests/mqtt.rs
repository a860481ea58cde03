//! The MQTT sink against a real Mosquitto started on a loopback port (`scripts/test.sh`
//! installs it): each forward arrives once per id with the topic template applied and `id`,
//! `class` and `device` in MQTT 5 user properties; a broker frozen under a batch (no PUBACK)
//! keeps its entries in the outbox, and a restart loses nothing (a batch counts as delivered
//! only once every PUBACK is in).

mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use support::*;
use tokio::sync::Notify;

/// A Mosquitto broker on a loopback port, with persistence in its own dir.
fn broker() -> Daemon {
    Daemon::start(|port, dir| {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(installed(
            "mosquitto",
            &["/usr/sbin/mosquitto", "/usr/bin/mosquitto"],
        ));
        cmd.arg("-c").arg(conf);
        cmd
    })
}

fn url(broker: &Daemon) -> String {
    format!("mqtt://127.0.0.1:{}", broker.port)
}

/// Everything a subscriber to `filter` received; it subscribes again after each reconnect.
struct Subscriber {
    got: Arc<Mutex<Vec<Publish>>>,
    arrived: Arc<Notify>,
    subacks: Arc<std::sync::atomic::AtomicUsize>,
    subscribed: Arc<Notify>,
}

impl Subscriber {
    async fn start(port: u16, filter: &str) -> Subscriber {
        let mut opts = MqttOptions::new("test-sub", "127.0.0.1", port);
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(3600));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let got: Arc<Mutex<Vec<Publish>>> = Arc::default();
        let arrived = Arc::new(Notify::new());
        let subscribed = Arc::new(Notify::new());
        let subacks: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let (g, a, s, n) = (
            got.clone(),
            arrived.clone(),
            subscribed.clone(),
            subacks.clone(),
        );
        let filter = filter.to_string();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client
                            .subscribe(filter.clone(), QoS::AtLeastOnce)
                            .await
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        s.notify_waiters();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        g.lock().unwrap().push(p);
                        a.notify_waiters();
                    }
                    Ok(_) => {}
                    // The broker restarts: poll again (rumqttc reconnects).
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let sub = Subscriber {
            got,
            arrived,
            subacks,
            subscribed,
        };
        sub.wait_subscribed(1).await;
        sub
    }

    /// Waits until it has subscribed `n` times (once per connection).
    async fn wait_subscribed(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.subscribed.notified();
            if self.subacks.load(std::sync::atomic::Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::timeout_at(deadline, notified)
                .await
                .expect("subscribed within 10 s");
        }
    }

    /// Waits until the distinct ids received satisfy `pred`, or `timeout`.
    async fn wait_for(&self, timeout: Duration, pred: impl Fn(&BTreeSet<String>) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            if pred(&ids(&self.got.lock().unwrap())) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

fn props(p: &Publish) -> HashMap<String, String> {
    p.properties
        .as_ref()
        .map(|pp| pp.user_properties.iter().cloned().collect())
        .unwrap_or_default()
}

fn ids(got: &[Publish]) -> BTreeSet<String> {
    got.iter().filter_map(|p| props(p).remove("id")).collect()
}

fn config(broker: &Daemon, dir: &Path) -> String {
    format!(
        "{}[uplink]\nsink = \"mqtt\"\nurl = \"{}\"\ntimeout_ms = 2000\n[uplink.mqtt]\ntopic = \"tp/{{gateway}}/{{class}}/{{topic}}\"\n[outbox]\nmax_delay_ms = 20\nlinger_ms = 200\nretry_base_ms = 50\nretry_max_ms = 400\n",
        wat_handler(dir, "fwd", include_str!("handlers/forwarder.wat"), ""),
        url(broker)
    )
}

fn expected(device: &str, last: u64) -> BTreeSet<String> {
    (1..=last)
        .map(|s| format!("gw-test:{device}:{s}:fwd:0"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_reach_the_broker_with_the_topic_template_and_their_id_and_class() {
    let broker = broker();
    let sub = Subscriber::start(broker.port, "tp/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(&config(&broker, dir.path()));
    let dev = gw.connect("dev-m").await;
    let mut s = dev.open().await.unwrap();
    for seq in 1..=20 {
        s.push(&publish(
            seq,
            "devices/dev-m/t",
            format!("p{seq}").as_bytes(),
        ));
    }
    s.flush().await.unwrap();
    until_ack(&mut s, 20).await;
    let want = expected("dev-m", 20);
    sub.wait_for(Duration::from_secs(15), |got| *got == want)
        .await;
    let got = sub.got.lock().unwrap().clone();
    assert_eq!(ids(&got), want, "every forward, each id");
    let first = got
        .iter()
        .find(|p| props(p)["id"] == "gw-test:dev-m:1:fwd:0")
        .unwrap();
    assert_eq!(&first.topic[..], b"tp/gw-test/normal/devices/dev-m/t");
    assert_eq!(&first.payload[..], b"p1");
    assert_eq!(props(first)["class"], "normal");
    assert_eq!(props(first)["device"], "dev-m");
    dev.close().await;
    let m = gw.stop();
    assert_eq!(m["events_sent"], 20, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing() {
    let mut broker = broker();
    let sub = Subscriber::start(broker.port, "tp/#").await;
    let dir = tempfile::tempdir().unwrap();
    // A first retry a second or more after a failure: time for the test's subscriber to be
    // back (the broker keeps no messages for it across its restart).
    let config = config(&broker, dir.path())
        .replace("retry_base_ms = 50", "retry_base_ms = 2000")
        .replace("retry_max_ms = 400", "retry_max_ms = 4000");
    let mut gw = Gateway::start(&config);
    let dev = gw.connect("dev-r").await;
    let mut s = dev.open().await.unwrap();
    let mut seq = 0;
    let mut burst = |s: &mut tidepool::client::FrameStream, n: u64| {
        for _ in 0..n {
            seq += 1;
            s.push(&publish(seq, "devices/dev-r/t", b"x"));
        }
        seq
    };
    let last = burst(&mut s, 200);
    s.flush().await.unwrap();
    until_ack(&mut s, last).await;
    let want = expected("dev-r", last);
    sub.wait_for(Duration::from_secs(15), |got| got.is_superset(&want))
        .await;
    // Frozen under a burst: the publishes are written, no PUBACK comes, and the entries stay
    // in the outbox (a sink that counted a write as delivered would lose them here).
    broker.signal("-STOP");
    let last = burst(&mut s, 100);
    s.flush().await.unwrap();
    until_ack(&mut s, last).await;
    gw.wait_log("no PUBACK", 1, Duration::from_secs(15)).await;
    let st = cli(&["status", "--json"], &gw.config);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert!(
        v["outbox"]["entries"].as_u64().unwrap() > 0,
        "unacknowledged publishes stay in the outbox: {v}"
    );
    broker.signal("-CONT");
    // Then down altogether; events keep coming and wait in the outbox, the uplink failing.
    broker.stop();
    let last = burst(&mut s, 200);
    s.flush().await.unwrap();
    until_ack(&mut s, last).await;
    gw.wait_log("uplink failed: MQTT", 1, Duration::from_secs(10))
        .await;
    broker.run();
    sub.wait_subscribed(2).await;
    let last = burst(&mut s, 100);
    s.flush().await.unwrap();
    until_ack(&mut s, last).await;
    let want = expected("dev-r", last);
    sub.wait_for(Duration::from_secs(30), |got| *got == want)
        .await;
    let got = ids(&sub.got.lock().unwrap());
    assert_eq!(
        got.len(),
        want.len(),
        "missing {:?}",
        want.difference(&got).take(10).collect::<Vec<_>>()
    );
    gw.wait_outbox_empty(Duration::from_secs(10)).await;
    dev.close().await;
    let m = gw.stop();
    assert!(
        m["send_failures"].as_u64().unwrap() > 0,
        "the outage was seen: {m}"
    );
}
