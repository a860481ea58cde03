//! The load generator of `scripts/bench.sh`.
//!
//! `loadgen tidepool`: N devices, each its own QUIC connection and stream, publish 100-byte
//! events with a window of W in flight (or at a fixed total rate); prints events/s and the
//! ack latency p50/p99/max (send to the cumulative ack that covers it). With `--flooders F`, the
//! first F devices flood instead (as fast as answers come, and after a `busy` straight back on
//! a new stream, ignoring its `retry_after_ms`) until the others are done, and the figures are
//! the others'.
//! `loadgen sled`: the baseline on the same disk: batches of one 100-byte value per event,
//! one flush per batch.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tidepool::client::{Device, FrameStream};
use tidepool::proto::msg::{DeviceMsg, GatewayMsg, Publish};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The gateway and the simulated devices' certificates.
#[derive(clap::Args)]
struct Fleet {
    #[arg(long)]
    gateway: String,
    /// Directory with ca.crt and dev-I.crt / dev-I.key for I in 1..=devices.
    #[arg(long)]
    certs: PathBuf,
    #[arg(long, default_value_t = 8)]
    devices: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Publish through a running gateway.
    Tidepool {
        #[command(flatten)]
        fleet: Fleet,
        #[arg(long, default_value_t = 20_000)]
        events_per_device: u64,
        #[arg(long, default_value_t = 512)]
        window: u64,
        /// Total events/s across devices (0: as fast as acks allow).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        /// Readings follow a slow random walk per device (a real sensor: threshold crossings
        /// are rare) instead of uniform noise in 20..32 (a crossing every few readings).
        #[arg(long)]
        walk: bool,
        /// Print `acked dev-I SEQ` for every ack as it arrives: what a power-cut check holds
        /// the gateway to.
        #[arg(long)]
        progress: bool,
        /// Devices (the first ones) that flood, hostile, while the others publish as told.
        #[arg(long, default_value_t = 0)]
        flooders: usize,
    },
    /// Connect the fleet's devices (each with its `hello` answered, at most 8 handshakes at
    /// once), print `connected N`, then hold the connections idle for `--seconds` (0: until
    /// SIGINT/SIGTERM) and close them: what a box's memory per idle device is measured with.
    Hold {
        #[command(flatten)]
        fleet: Fleet,
        #[arg(long, default_value_t = 0)]
        seconds: u64,
    },
    /// Print each device's durable high-water mark (`hello` → `welcome`) as `mark dev-I N`.
    Marks {
        #[command(flatten)]
        fleet: Fleet,
    },
    /// Raw sled batched inserts on the same disk.
    Sled {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        #[arg(long, default_value_t = 1000)]
        batch: u64,
        #[arg(long, default_value_t = 100)]
        value_bytes: usize,
    },
    /// The group-commit write shape, two ways: per event a state key and an outbox key
    /// (100 bytes each), plus one high-water mark per group, one flush per group; either one
    /// `apply_batch` on one tree with prefixed keys (what the gateway does) or one transaction
    /// over three trees.
    SledGroup {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        #[arg(long, default_value_t = 1000)]
        group: u64,
        #[arg(long, value_parser = ["batch", "txn"])]
        mode: String,
        /// sled's flush alone, no fdatasync (what the gateway did before: not power-cut safe);
        /// shows what the fsync costs at a given group size.
        #[arg(long)]
        flush_only: bool,
    },
}

/// A JSON reading padded to `n` bytes: `{"v": 21.5, "pad": "xxx"}`.
fn payload(n: usize, v: f64) -> Vec<u8> {
    let head = format!("{{\"v\": {v:.1}, \"pad\": \"");
    let pad = n.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad)).into_bytes()
}

/// What a simulated device's readings look like.
#[derive(Clone, Copy)]
struct Readings {
    bytes: usize,
    walk: bool,
}

/// Connects as device `id` (its certificate in `certs`), opens a stream and asks for its
/// durable high-water mark (`hello` → `welcome`).
async fn hello(
    gateway: &str,
    certs: &std::path::Path,
    id: &str,
) -> anyhow::Result<(Device, FrameStream, u64)> {
    let dev = Device::connect(
        gateway,
        &certs.join("ca.crt"),
        &certs.join(format!("{id}.crt")),
        &certs.join(format!("{id}.key")),
    )
    .await?;
    let mut s = dev.open().await?;
    s.send(&DeviceMsg::Hello).await?;
    loop {
        match s.next().await? {
            Some(GatewayMsg::Welcome { hwm, .. }) => return Ok((dev, s, hwm)),
            Some(_) => continue,
            None => anyhow::bail!("{id}: the gateway ended the stream before its welcome"),
        }
    }
}

/// How a simulated device publishes: how many events, how many in flight, at what rate
/// (events/s, 0: as fast as acks allow), and whether it prints its acks as they come.
#[derive(Clone, Copy)]
struct Pace {
    events: u64,
    window: u64,
    rate: f64,
    progress: bool,
}

async fn device(
    gateway: String,
    certs: PathBuf,
    i: usize,
    pace: Pace,
    readings: Readings,
) -> anyhow::Result<Vec<Duration>> {
    let Pace {
        events,
        window,
        rate,
        progress,
    } = pace;
    let id = format!("dev-{i}");
    let (dev, mut s, hwm) = hello(&gateway, &certs, &id).await?;
    let topic = format!("devices/{id}/temp");
    let mut sent_at: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut lat = Vec::with_capacity(events as usize);
    let (first, last) = (hwm + 1, hwm + events);
    let mut next = first;
    let mut acked = hwm;
    let start = Instant::now();
    let mut rng = fastrand::Rng::with_seed(i as u64);
    // Levels from 24 to 31: a few devices sit near the threshold (30) and cross it now and then.
    let mut level = 24.0 + rng.f64() * 7.0;
    let due = |seq: u64| start + Duration::from_secs_f64((seq - first) as f64 / rate);
    while acked < last {
        let now = Instant::now();
        let mut pushed = false;
        while next <= last && next - acked <= window && (rate <= 0.0 || due(next) <= now) {
            let v = if readings.walk {
                level = (level + (rng.f64() - 0.5) * 0.2).clamp(15.0, 35.0);
                level
            } else {
                20.0 + rng.f64() * 12.0
            };
            s.push(&DeviceMsg::Publish(Publish {
                seq: next,
                topic: topic.clone(),
                payload: payload(readings.bytes, v).into(),
                ts: None,
                id: None,
                src: None,
                class: None,
            }));
            sent_at.push_back((next, now));
            next += 1;
            pushed = true;
        }
        if pushed {
            s.flush().await?;
        }
        let wake = (rate > 0.0 && next <= last && next - acked <= window).then(|| due(next));
        tokio::select! {
            m = s.next() => match m? {
                Some(GatewayMsg::Ack { seq }) => {
                    let now = Instant::now();
                    while let Some((_, t)) = sent_at.front().filter(|(q, _)| *q <= seq).copied() {
                        sent_at.pop_front();
                        lat.push(now - t);
                    }
                    acked = acked.max(seq);
                    if progress {
                        println!("acked {id} {acked}");
                    }
                }
                Some(other) => anyhow::bail!("{id}: unexpected {other:?}"),
                None => anyhow::bail!("{id}: stream closed"),
            },
            _ = tokio::time::sleep_until(wake.unwrap_or(now).into()), if wake.is_some() => {}
        }
    }
    dev.close().await;
    Ok(lat)
}

/// The store the sled baselines write to: the gateway's settings (no background flusher).
/// The baselines open sled as the gateway does (`Store::open`: periodic flush off, 4 MiB cache)
/// and make each write durable as it does (`Store::sync`: flush, then fdatasync of the log and
/// fsync of new blobs), so the ratio compares the same durability.
fn open_sled(dir: &std::path::Path) -> anyhow::Result<tidepool::store::Store> {
    Ok(tidepool::store::Store::open(dir, 4 << 20)?)
}

/// A hostile device: publishes windows of `window` as fast as the answers come, and after a
/// `busy` opens a new stream and resends from its seq at once, until `stop`. Returns the events
/// it got kept and the busy answers it was sent.
async fn flood(
    gateway: String,
    certs: PathBuf,
    i: usize,
    window: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(u64, u64)> {
    let id = format!("dev-{i}");
    let (dev, s, hwm) = hello(&gateway, &certs, &id).await?;
    drop(s);
    let topic = format!("devices/{id}/temp");
    let (mut next, mut busy) = (hwm + 1, 0);
    let flooding = async {
        loop {
            let mut s = dev.open().await?;
            let last = next + window - 1;
            for seq in next..=last {
                s.push(&DeviceMsg::Publish(Publish {
                    seq,
                    topic: topic.clone(),
                    payload: payload(100, 21.0).into(),
                    ts: None,
                    id: None,
                    src: None,
                    class: None,
                }));
            }
            s.flush().await?;
            while next <= last {
                match s.next().await? {
                    Some(GatewayMsg::Ack { seq }) => next = next.max(seq + 1),
                    Some(GatewayMsg::Busy { seq, .. }) => {
                        busy += 1;
                        next = seq;
                        break;
                    }
                    Some(other) => anyhow::bail!("{id}: unexpected {other:?}"),
                    None => break,
                }
            }
        }
    };
    tokio::select! {
        r = flooding => r?,
        _ = stop.wait_for(|s| *s) => {}
    }
    dev.close().await;
    Ok((next - 1 - hwm, busy))
}

fn report(label: &str, events: u64, start: Instant) {
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{label} events={events} seconds={secs:.3} events_per_s={:.0}",
        events as f64 / secs
    );
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Tidepool {
            fleet:
                Fleet {
                    gateway,
                    certs,
                    devices,
                },
            events_per_device,
            window,
            rate,
            payload_bytes,
            walk,
            progress,
            flooders,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (stop_tx, stop) = tokio::sync::watch::channel(false);
                let floods: Vec<_> = (1..=flooders.min(devices))
                    .map(|i| tokio::spawn(flood(gateway.clone(), certs.clone(), i, window, stop.clone())))
                    .collect();
                let start = Instant::now();
                let calm = devices.saturating_sub(flooders).max(1);
                let per_device_rate = rate / calm as f64;
                let tasks: Vec<_> = (flooders + 1..=devices)
                    .map(|i| tokio::spawn(device(gateway.clone(), certs.clone(), i, Pace { events: events_per_device, window, rate: per_device_rate, progress }, Readings { bytes: payload_bytes, walk })))
                    .collect();
                let mut lat = Vec::new();
                for t in tasks {
                    lat.extend(t.await??);
                }
                let secs = start.elapsed().as_secs_f64();
                let _ = stop_tx.send(true);
                let (mut flood_kept, mut flood_busy) = (0, 0);
                for f in floods {
                    let (kept, busy) = f.await??;
                    flood_kept += kept;
                    flood_busy += busy;
                }
                lat.sort_unstable();
                let n = lat.len();
                anyhow::ensure!(n > 0, "no device published (--devices must exceed --flooders)");
                let flooding = match flooders {
                    0 => String::new(),
                    _ => format!(" flood_kept={flood_kept} flood_busy={flood_busy}"),
                };
                println!(
                    "tidepool events={n} seconds={secs:.3} events_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}{flooding}",
                    n as f64 / secs,
                    pct(&lat, 0.50),
                    pct(&lat, 0.99),
                    pct(&lat, 1.0)
                );
                anyhow::Ok(())
            })
        }
        Cmd::Hold {
            fleet:
                Fleet {
                    gateway,
                    certs,
                    devices,
                },
            seconds,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
                let tasks: Vec<_> = (1..=devices)
                    .map(|i| {
                        let (gateway, certs, gate) = (gateway.clone(), certs.clone(), gate.clone());
                        tokio::spawn(async move {
                            let _turn = gate.acquire_owned().await?;
                            let id = format!("dev-{i}");
                            // As a device would: a handshake lost on a busy loopback (a
                            // thousand in a row) is tried again, twice.
                            let mut tries = 0;
                            loop {
                                match hello(&gateway, &certs, &id).await {
                                    Ok((dev, s, _)) => return anyhow::Ok((dev, s)),
                                    Err(e) if tries < 2 => {
                                        tries += 1;
                                        eprintln!("{id}: {e}; trying again");
                                    }
                                    Err(e) => return Err(e),
                                }
                            }
                        })
                    })
                    .collect();
                let mut held = Vec::with_capacity(devices);
                for t in tasks {
                    held.push(t.await??);
                }
                println!("connected {}", held.len());
                use std::io::Write as _;
                std::io::stdout().flush()?;
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let hold = async {
                    match seconds {
                        0 => std::future::pending().await,
                        s => tokio::time::sleep(Duration::from_secs(s)).await,
                    }
                };
                tokio::select! {
                    _ = hold => {}
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                let closing: Vec<_> = held
                    .into_iter()
                    .map(|(dev, s)| {
                        drop(s);
                        tokio::spawn(dev.close())
                    })
                    .collect();
                for c in closing {
                    c.await?;
                }
                anyhow::Ok(())
            })
        }
        Cmd::Marks {
            fleet:
                Fleet {
                    gateway,
                    certs,
                    devices,
                },
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                for i in 1..=devices {
                    let id = format!("dev-{i}");
                    let (dev, _, hwm) = hello(&gateway, &certs, &id).await?;
                    println!("mark {id} {hwm}");
                    dev.close().await;
                }
                anyhow::Ok(())
            })
        }
        Cmd::Sled {
            dir,
            events,
            batch,
            value_bytes,
        } => {
            let store = open_sled(&dir)?;
            let tree = store.raw_db().open_tree("bench")?;
            let value = vec![b'x'; value_bytes];
            let start = Instant::now();
            let mut i = 0u64;
            while i < events {
                let mut b = sled::Batch::default();
                for _ in 0..batch.min(events - i) {
                    b.insert(&i.to_be_bytes(), value.as_slice());
                    i += 1;
                }
                tree.apply_batch(b)?;
                store.sync()?;
            }
            report("sled", events, start);
            Ok(())
        }
        Cmd::SledGroup {
            dir,
            events,
            group,
            mode,
            flush_only,
        } => {
            use sled::Transactional;
            let store = open_sled(&dir)?;
            let db = store.raw_db();
            let one = db.open_tree("one")?;
            let (state, outbox, marks) =
                (db.open_tree("s")?, db.open_tree("o")?, db.open_tree("h")?);
            let value = vec![b'x'; 100];
            let start = Instant::now();
            let mut i = 0u64;
            while i < events {
                let n = group.min(events - i);
                if mode == "batch" {
                    let mut b = sled::Batch::default();
                    for k in i..i + n {
                        b.insert(
                            [b"s/".as_slice(), &(k % 64).to_be_bytes()].concat(),
                            value.as_slice(),
                        );
                        b.insert(
                            [b"o/".as_slice(), &k.to_be_bytes()].concat(),
                            value.as_slice(),
                        );
                    }
                    b.insert(b"h/dev".as_slice(), &(i + n).to_be_bytes());
                    one.apply_batch(b)?;
                } else {
                    let r: sled::transaction::TransactionResult<(), ()> = (&state, &outbox, &marks)
                        .transaction(|(s, o, h)| {
                            for k in i..i + n {
                                s.insert(&(k % 64).to_be_bytes(), value.as_slice())?;
                                o.insert(&k.to_be_bytes(), value.as_slice())?;
                            }
                            h.insert(b"dev", &(i + n).to_be_bytes())?;
                            Ok(())
                        });
                    r.map_err(|e| anyhow::anyhow!("transaction: {e:?}"))?;
                }
                if flush_only {
                    db.flush()?;
                } else {
                    store.sync()?;
                }
                i += n;
            }
            let label = if flush_only { "-flush-only" } else { "" };
            report(&format!("sled-{mode}{label}"), events, start);
            Ok(())
        }
    }
}
