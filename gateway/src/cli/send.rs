//! `tidepool send`: publish events as a device, with the real protocol, and report the acks.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tidepool::client::{Device, FrameStream};
use tidepool::proto::msg::{DeviceMsg, GatewayMsg, Publish};

/// Publish events to a gateway as a device.
///
/// Asks the gateway where to continue (`hello`), sends each payload with the next seq, waits
/// for every answer, and prints a summary. Exits non-zero unless every event was acked.
#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["payload", "stdin"]))]
pub struct Args {
    /// The gateway, HOST:PORT (the host must be a name in its server certificate).
    #[arg(long, default_value = "localhost:7700")]
    gateway: String,
    /// The device certificate (its CN is the device id).
    #[arg(long)]
    cert: PathBuf,
    /// The device's private key.
    #[arg(long)]
    key: PathBuf,
    /// The CA that signed the gateway's certificate (ca.crt from `tidepool certs device`).
    #[arg(long)]
    ca: PathBuf,
    /// The topic, e.g. devices/ID/temp.
    #[arg(long)]
    topic: String,
    /// The payload (sent as bytes).
    #[arg(long)]
    payload: Option<String>,
    /// Read payloads from standard input, one per line.
    #[arg(long)]
    stdin: bool,
    /// How many times to send the payload (with --payload).
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Events per second (0: as fast as the acks allow).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Events in flight before waiting for acks.
    #[arg(long, default_value_t = 256)]
    window: u64,
}

#[derive(Default)]
struct Tally {
    /// Events settled (acked or nacked), counted from the first seq.
    settled: u64,
    acked: u64,
    nacked: Vec<(u64, String, String)>,
    busy: Option<(u64, u64)>,
}

fn apply(t: &mut Tally, m: GatewayMsg, first: u64) {
    match m {
        GatewayMsg::Ack { seq } => t.settled = t.settled.max(seq.saturating_sub(first - 1)),
        GatewayMsg::Nack { seq, code, reason } => {
            t.settled = t.settled.max(seq.saturating_sub(first - 1));
            t.nacked.push((seq, code.as_str().into(), reason));
        }
        GatewayMsg::Busy {
            seq,
            retry_after_ms,
        } => t.busy = Some((seq, retry_after_ms)),
        GatewayMsg::Welcome { .. } => {}
    }
}

async fn wait(s: &mut FrameStream, t: &mut Tally, first: u64, until: u64) -> anyhow::Result<()> {
    while t.settled < until && t.busy.is_none() {
        match s.next().await? {
            Some(m) => apply(t, m, first),
            None => anyhow::bail!("the gateway closed the stream"),
        }
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let payloads: Box<dyn Iterator<Item = Vec<u8>>> = match &a.payload {
        Some(p) => {
            let p = p.clone().into_bytes();
            Box::new((0..a.count).map(move |_| p.clone()))
        }
        None => Box::new(
            std::io::stdin()
                .lock()
                .lines()
                .map_while(Result::ok)
                .map(String::into_bytes)
                .collect::<Vec<_>>()
                .into_iter(),
        ),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let dev = match Device::connect(&a.gateway, &a.ca, &a.cert, &a.key).await {
            Ok(d) => d,
            Err(e) => {
                let text = e.to_string();
                let hint = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
                    format!(
                        "the gateway's certificate does not check against {}; is it the ca.crt that `tidepool certs device -c CONFIG` wrote for this gateway (from its data dir)?",
                        a.ca.display()
                    )
                } else if text.contains("NotValidForName") {
                    format!(
                        "the gateway's certificate is not issued for `{}`: connect by a name it covers (localhost, 127.0.0.1 and its gateway.server_names)",
                        a.gateway
                    )
                } else {
                    return Err(e).context("connecting");
                };
                anyhow::bail!("connecting: {text}: {hint}");
            }
        };
        let mut s = dev.open().await?;
        s.send(&DeviceMsg::Hello).await?;
        let hwm = loop {
            match s.next().await.context("waiting for welcome")? {
                Some(GatewayMsg::Welcome { hwm, .. }) => break hwm,
                Some(_) => continue,
                None => anyhow::bail!(
                    "the gateway closed the stream (is this certificate from its device CA?)"
                ),
            }
        };
        let Some(first) = hwm.checked_add(1) else {
            anyhow::bail!("the gateway's mark for this device is the largest seq there is ({hwm}): it can publish nothing more under this id");
        };
        let started = Instant::now();
        let mut t = Tally::default();
        let mut sent = 0u64;
        for p in payloads {
            if a.rate > 0.0 {
                let due = started + Duration::from_secs_f64(sent as f64 / a.rate);
                tokio::time::sleep_until(due.into()).await;
            }
            s.push(&DeviceMsg::Publish(Publish {
                seq: first.saturating_add(sent),
                topic: a.topic.clone(),
                payload: Bytes::from(p),
                ts: Some(tidepool::clock::now_ms()),
                id: None,
                src: None,
                class: None,
            }));
            sent += 1;
            if a.rate > 0.0 || sent % 64 == 0 {
                s.flush().await?;
            }
            if sent >= t.settled + a.window {
                s.flush().await?;
                wait(&mut s, &mut t, first, sent - a.window / 2).await?;
            }
            if t.busy.is_some() {
                break;
            }
        }
        s.flush().await?;
        let _ = s.send.finish();
        wait(&mut s, &mut t, first, sent).await?;
        t.acked = t.settled - t.nacked.len() as u64;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "sent {sent} events as seq {first}..={} in {secs:.3} s; acked {} ({} nacked)",
            first + sent.max(1) - 1,
            t.acked,
            t.nacked.len()
        );
        for (seq, code, reason) in &t.nacked {
            println!("nack seq {seq}: {code}: {reason}");
        }
        if let Some((seq, after)) = t.busy {
            println!("busy from seq {seq}: retry after {after} ms");
        }
        dev.close().await;
        let ok = t.nacked.is_empty() && t.busy.is_none() && t.acked == sent;
        Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}
