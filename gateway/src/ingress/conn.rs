//! One device connection: identity from the certificate, its streams (frames in, settled
//! answers out) and its datagrams. Superseding and shutdown stop the reading, let what was
//! submitted settle and be answered, then close with the protocol's code.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::{watch, Notify, Semaphore};

use super::{HandshakeSlot, Shared};
use crate::dispatch::thread::{Batch, Gate, Step, STEP_BYTES};
use crate::metrics::Metrics;
use crate::pipeline::Settled;
use crate::proto::frame::FrameDecoder;
use crate::proto::msg::{self, DeviceMsg, GatewayMsg, NackCode};
use crate::proto::{topic, CloseCode};

/// Items a stream may have submitted and not yet answered before it stops reading.
const MAX_UNANSWERED: usize = 8192;

/// Items of one stream submitted and not yet written back, and a wake-up for the reader.
#[derive(Default)]
struct Unanswered {
    count: AtomicUsize,
    written: Notify,
}

/// Which stream of a connection may publish: one at a time, so that a device's seqs arrive in
/// the order it sent them (a stream running ahead of another would make the other's lower seqs
/// look like resends, acked and never run). 0 = none; streams hold a token from `next`.
#[derive(Default)]
struct PublishSlot {
    holder: AtomicU64,
    next: AtomicU64,
}

impl PublishSlot {
    fn token(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }
    /// Takes the slot for `token` unless another stream holds it.
    fn take(&self, token: u64) -> bool {
        self.holder
            .compare_exchange(0, token, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            || self.holder.load(Ordering::Acquire) == token
    }
    fn release(&self, token: u64) {
        let _ = self
            .holder
            .compare_exchange(token, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// How long a closing connection waits for its streams to answer what they submitted.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

fn code(c: CloseCode) -> VarInt {
    VarInt::from_u32(c as u32)
}

pub(super) async fn run(
    incoming: quinn::Incoming,
    handshake: HandshakeSlot,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let timeout = Duration::from_millis(shared.ingress.handshake_timeout_ms);
    let mut connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%remote, "handshake refused: {e}");
            return;
        }
    };
    // The ALPN is known before the client's certificate is checked: an operator from outside
    // admin.allow_from is dropped then.
    let handshaking = async {
        let alpn = connecting
            .handshake_data()
            .await
            .ok()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol);
        let admin = alpn.as_deref() == Some(crate::proto::ALPN_ADMIN);
        if admin && !shared.admin.allows(remote.ip()) {
            return Ok(None);
        }
        connecting.await.map(|c| Some((c, admin)))
    };
    // Dropping the handshake (on timeout, or when the gateway stops) drops the connection:
    // quinn closes it.
    let handshake_done = tokio::select! {
        r = tokio::time::timeout(timeout, handshaking) => r,
        _ = stop.changed() => return,
    };
    let (conn, admin) = match handshake_done {
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => {
            shared
                .admin
                .refused(remote, "its address is not in admin.allow_from");
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(%remote, "handshake refused: {e}");
            return;
        }
        Err(_) => {
            Metrics::inc(&shared.metrics.handshakes_timed_out);
            tracing::debug!(%remote, "handshake given up after {timeout:?}");
            return;
        }
    };
    let chain = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .unwrap_or_default();
    if admin {
        drop(handshake);
        return crate::admin::channel::run(conn, chain, shared, stop).await;
    }
    if !shared.roles.is_device(&chain) {
        tracing::info!(%remote, "closing: certificate is not a device certificate");
        conn.close(code(CloseCode::WrongRole), CloseCode::WrongRole.reason());
        return;
    }
    let id = chain
        .first()
        .and_then(|c| crate::pki::common_name(c))
        .filter(|cn| topic::valid_device_id(cn));
    let Some(device) = id else {
        tracing::info!(%remote, "closing: certificate CN is not a valid device id");
        conn.close(code(CloseCode::WrongRole), b"bad device id");
        return;
    };
    let device: Arc<str> = device.into();
    let serial = chain
        .first()
        .and_then(|c| crate::pki::serial_hex(c))
        .unwrap_or_default();
    drop(handshake);
    // Counted (max_connections) from `register`, by the session itself: a superseded or
    // revoked session leaves the map, and the count, at once.
    let Some((session, mut ended)) = shared.register(&device, serial.clone()) else {
        Metrics::inc(&shared.metrics.connections_revoked);
        tracing::info!(%remote, device = &*device, serial, "closing: the device is revoked (acl.revoked)");
        conn.close(code(CloseCode::Revoked), CloseCode::Revoked.reason());
        return;
    };
    Metrics::inc(&shared.metrics.connections);
    tracing::debug!(%remote, device = &*device, "device connected");

    // Stream tasks stop reading when `halt` turns true (superseded or shutting down).
    let (halt_tx, halt) = watch::channel(false);
    let mut streams = tokio::task::JoinSet::new();
    let slot = Arc::new(PublishSlot::default());
    // This connection's share of the dispatcher's inbox: one device flooding leaves room for
    // the others (and the dispatcher takes devices in turns).
    let share = shared.inbox.connection_share();
    let datagrams = tokio::spawn(read_datagrams(
        conn.clone(),
        (device.clone(), session, share.clone()),
        shared.clone(),
        ended.clone(),
    ));
    let reason = loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let watch = (halt.clone(), ended.clone());
                    let slot = (slot.clone(), slot.token());
                    let who = (device.clone(), session, share.clone());
                    streams.spawn(stream(send, recv, who, shared.clone(), watch, slot));
                }
                Err(_) => break None,
            },
            _ = ended.changed() => {
                // Superseded or revoked (already out of the count): settle, then close.
                break Some((*ended.borrow()).unwrap_or(CloseCode::Superseded));
            }
            _ = stop.changed() => break Some(CloseCode::ShuttingDown),
        }
        while streams.try_join_next().is_some() {}
    };
    let _ = halt_tx.send(true);
    datagrams.abort();
    // What this session handed over and the dispatcher has not taken yet is dropped unread
    // (the device resends it): a stop does not wait for a full inbox's worth of handlers.
    shared.inbox.disconnected(&device, session);
    // Settle: every stream answers what it submitted before we close (bounded: a device that
    // stops reading its answers must not hold the connection forever).
    let settle = async { while streams.join_next().await.is_some() {} };
    if tokio::time::timeout(SETTLE, settle).await.is_err() {
        tracing::info!(
            device = &*device,
            "streams did not settle within {SETTLE:?}; closing anyway"
        );
        streams.abort_all();
    }
    if let Some(c) = reason {
        tracing::debug!(device = &*device, reason = ?c, "closing connection");
        conn.close(code(c), c.reason());
    }
    shared.unregister(&device, session);
}

async fn read_datagrams(
    conn: quinn::Connection,
    (device, session, share): (Arc<str>, u64, Arc<Semaphore>),
    shared: Arc<Shared>,
    ended: watch::Receiver<Option<CloseCode>>,
) {
    while let Ok(d) = conn.read_datagram().await {
        if ended.borrow().is_some() {
            return;
        }
        Metrics::add(&shared.metrics.bytes_in, d.len() as u64);
        Metrics::inc(&shared.metrics.datagrams_in);
        let received = crate::clock::stamp();
        let kept = match msg::decode(&d, false) {
            // Shed before it takes a token while the dispatcher is behind; past the device's
            // spare rate, dropped too.
            Ok(DeviceMsg::Publish(_))
                if shared.inbox.is_half_full() || shared.rate(&device, true).is_err() =>
            {
                false
            }
            Ok(DeviceMsg::Publish(p)) => {
                shared
                    .inbox
                    .datagram((session, &share), &device, p, received)
            }
            _ => false,
        };
        if !kept {
            // Not a publish, or no room left for frames: shed (the dispatcher counts the rest).
            Metrics::inc(&shared.metrics.datagrams_dropped);
        }
    }
}

async fn stream(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    (device, session, share): (Arc<str>, u64, Arc<Semaphore>),
    shared: Arc<Shared>,
    (mut halt, ended): (watch::Receiver<bool>, watch::Receiver<Option<CloseCode>>),
    (slot, token): (Arc<PublishSlot>, u64),
) {
    let (reply, answers) = unbounded_channel();
    let unanswered = Arc::new(Unanswered::default());
    let writer = tokio::spawn(write_answers(
        send,
        answers,
        shared.ingress.max_frame_bytes.into(),
        unanswered.clone(),
    ));
    let mut decoder = FrameDecoder::new(shared.ingress.max_frame_bytes);
    let mut prev_seq = 0u64;
    let mut framing_lost = None;
    let gate = Arc::new(Gate::default());
    let mut read_and_dropped = false;
    let batch_bytes = shared.inbox.connection_bytes();
    let mut buffered = false;
    // Past the device's rate: the wait before reading on (a frame that is not a publish), and
    // the wait the stream is held open after a rate busy (so a device cannot churn streams for
    // busy answers faster than `max_streams_per_connection` a wait).
    let (mut pause, mut held) = (None, None);
    'read: loop {
        // A device that does not read its answers stops being read (QUIC flow control then
        // stops it): the answers waiting for it stay bounded.
        while unanswered.count.load(Ordering::Acquire) > MAX_UNANSWERED {
            tokio::select! {
                _ = unanswered.written.notified() => {}
                _ = halt.changed() => break 'read,
                _ = gate.halted() => break 'read,
            }
        }
        // Frames left from the last read (its batch was full) are handed over before reading on.
        if !std::mem::take(&mut buffered) {
            let chunk = tokio::select! {
                c = recv.read_chunk(64 * 1024, true) => c,
                _ = halt.changed() => break 'read,
                // A batch ended in busy, or was dropped (superseded): nothing after it is kept.
                _ = gate.halted() => break 'read,
            };
            let chunk = match chunk {
                Ok(Some(c)) => c,
                Ok(None) | Err(_) => break 'read,
            };
            Metrics::add(&shared.metrics.bytes_in, chunk.bytes.len() as u64);
            decoder.extend(&chunk.bytes);
        }
        let received = crate::clock::stamp();
        let (mut steps, mut bytes, mut last) = (Vec::new(), 0, false);
        while !last {
            // A batch holds at most the connection's share of the inbox (many tiny frames are
            // charged STEP_BYTES each): the rest waits for the next batch.
            if bytes >= batch_bytes {
                buffered = true;
                break;
            }
            let frame = match decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    // What came before the broken frame is still taken and answered.
                    tracing::info!(device = &*device, "stream closed: {e}");
                    framing_lost = Some(e.close_code());
                    break;
                }
            };
            bytes += frame.len() + 4 + STEP_BYTES;
            // Every frame takes a token: a bad frame, a hello or a repeat costs the box a
            // decode and an answer as a publish does.
            let over = shared.rate(&device, false).err();
            steps.push(match msg::decode(&frame, true) {
                // Not a valid publish: nacked with the seq it carried, and it moves nothing
                // (neither this stream's order nor the device's mark).
                Err(bad) => Step::Nack {
                    seq: bad.seq,
                    code: NackCode::BadFrame,
                    reason: bad.reason,
                },
                Ok(DeviceMsg::Hello) => Step::Hello,
                Ok(DeviceMsg::Publish(p)) if p.seq <= prev_seq => Step::Nack {
                    seq: p.seq,
                    code: NackCode::BadFrame,
                    reason: format!(
                        "seq {} is not above the previous seq {prev_seq} on this stream",
                        p.seq
                    ),
                },
                // Past its rate (checked before the publishing slot: a device must not get
                // busy answers for free from streams that find the slot taken).
                Ok(DeviceMsg::Publish(p)) if over.is_some() => {
                    let wait = over.unwrap_or_default();
                    last = true;
                    held = Some(wait);
                    Step::Busy {
                        seq: p.seq,
                        retry_after_ms: Some(wait),
                    }
                }
                Ok(DeviceMsg::Publish(p)) if !slot.take(token) => {
                    // Another stream of this device is publishing: this one is not kept, and
                    // the device resends from this seq once that stream has ended.
                    tracing::debug!(
                        device = &*device,
                        seq = p.seq,
                        "busy: another stream of this device is publishing"
                    );
                    last = true;
                    Step::Busy {
                        seq: p.seq,
                        retry_after_ms: None,
                    }
                }
                Ok(DeviceMsg::Publish(p)) => {
                    prev_seq = p.seq;
                    Step::Publish(p)
                }
            });
            // Anything else cannot be answered busy: it is taken, and nothing more is read
            // for the wait.
            if let (Some(wait), false) = (over, last) {
                pause = Some(wait);
                buffered = true;
                break;
            }
        }
        if !steps.is_empty() {
            // Every step taken submits exactly one item (none is taken after a busy answer).
            unanswered.count.fetch_add(steps.len(), Ordering::AcqRel);
            let batch = Batch {
                session,
                device: device.clone(),
                steps,
                received,
                reply: reply.clone(),
                gate: gate.clone(),
            };
            // Waits for room (not reading meanwhile is the backpressure), and reads on. A newer
            // session of this device makes the dispatcher drop the batch unread (the device
            // resends it on the new connection) and halt the gate.
            let sent = tokio::select! {
                sent = shared.inbox.dispatch(batch, bytes, &share) => sent,
                _ = halt.changed() => {
                    // Read and not handed over: this stream keeps the publishing slot, so
                    // that no other stream's later seqs are kept (their acks would cover
                    // these, which never ran).
                    read_and_dropped = true;
                    break 'read;
                }
            };
            if sent.is_err() || gate.is_halted() {
                break 'read;
            }
        }
        if let Some(ms) = pause.take() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                _ = halt.changed() => break 'read,
                _ = gate.halted() => break 'read,
            }
        }
        if last || framing_lost.is_some() || ended.borrow().is_some() {
            break 'read;
        }
    }
    if !read_and_dropped {
        slot.release(token);
    }
    if let Some(c) = framing_lost {
        // The code goes to the device as STOP_SENDING on its side of the stream.
        let _ = recv.stop(code(c));
    }
    drop(reply);
    // Finish (not reset) after the last answer: a reset could discard acks and nacks already
    // written but not yet delivered.
    if let Ok(Some(mut send)) = writer.await {
        let _ = send.finish();
    }
    // After a rate busy, the stream (its receive side) stays open for the wait: a device has
    // `max_streams_per_connection` of them, so it gets at most that many busy answers a wait.
    if let Some(ms) = held.filter(|_| !*halt.borrow()) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = halt.wait_for(|h| *h) => {}
        }
    }
    drop(recv);
}

/// Writes settled answers in order, coalescing consecutive acks into one cumulative ack.
/// Returns the send stream once every submitted item was answered (None if the peer left).
async fn write_answers(
    mut send: quinn::SendStream,
    mut answers: UnboundedReceiver<Settled>,
    max_frame_bytes: u64,
    unanswered: Arc<Unanswered>,
) -> Option<quinn::SendStream> {
    let mut buf = Vec::with_capacity(256);
    while let Some(first) = answers.recv().await {
        buf.clear();
        let mut answered = 0;
        let ready = std::iter::once(first).chain(std::iter::from_fn(|| answers.try_recv().ok()));
        let busy = encode_answers(ready.inspect(|_| answered += 1), max_frame_bytes, &mut buf);
        if send.write_all(&buf).await.is_err() {
            return None;
        }
        unanswered.count.fetch_sub(answered, Ordering::AcqRel);
        unanswered.written.notify_one();
        if busy {
            // Nothing after a busy is kept; the device resends from its seq on a new stream.
            while answers.recv().await.is_some() {}
        }
    }
    Some(send)
}

/// Encodes settled answers, in order, into `buf`: consecutive acks become one cumulative ack,
/// and an ack never overtakes a nack, welcome or busy settled after it. Returns whether a
/// busy answer was among them (nothing after it is written).
fn encode_answers(
    settled: impl Iterator<Item = Settled>,
    max_frame_bytes: u64,
    buf: &mut Vec<u8>,
) -> bool {
    let mut ack: Option<u64> = None;
    for s in settled {
        let (msg, busy) = match s {
            Settled::Ack(seq) => {
                ack = Some(ack.map_or(seq, |a| a.max(seq)));
                continue;
            }
            Settled::Nack { seq, code, reason } => (GatewayMsg::Nack { seq, code, reason }, false),
            Settled::Welcome { hwm } => (
                GatewayMsg::Welcome {
                    hwm,
                    max_frame_bytes,
                },
                false,
            ),
            Settled::Busy {
                seq,
                retry_after_ms,
            } => (
                GatewayMsg::Busy {
                    seq,
                    retry_after_ms,
                },
                true,
            ),
        };
        if let Some(a) = ack.take() {
            GatewayMsg::Ack { seq: a }.encode_frame(buf);
        }
        msg.encode_frame(buf);
        if busy {
            return true;
        }
    }
    if let Some(a) = ack {
        GatewayMsg::Ack { seq: a }.encode_frame(buf);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::FrameDecoder;
    use crate::proto::msg::decode_gateway;

    fn written(settled: Vec<Settled>) -> (Vec<GatewayMsg>, bool) {
        let mut buf = Vec::new();
        let busy = encode_answers(settled.into_iter(), 1000, &mut buf);
        let mut d = FrameDecoder::new(1 << 20);
        d.extend(&buf);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            out.extend(decode_gateway(&f).unwrap());
        }
        (out, busy)
    }

    fn nack(seq: u64) -> Settled {
        Settled::Nack {
            seq,
            code: NackCode::Acl,
            reason: "no".into(),
        }
    }

    #[test]
    fn acks_coalesce_but_never_overtake_what_was_settled_after_them() {
        let (out, busy) = written(vec![
            Settled::Ack(1),
            Settled::Ack(2),
            nack(3),
            Settled::Ack(4),
            Settled::Welcome { hwm: 4 },
            Settled::Ack(5),
            Settled::Ack(6),
        ]);
        assert!(!busy);
        assert_eq!(
            out,
            vec![
                GatewayMsg::Ack { seq: 2 },
                GatewayMsg::Nack {
                    seq: 3,
                    code: NackCode::Acl,
                    reason: "no".into()
                },
                GatewayMsg::Ack { seq: 4 },
                GatewayMsg::Welcome {
                    hwm: 4,
                    max_frame_bytes: 1000
                },
                GatewayMsg::Ack { seq: 6 },
            ]
        );
    }

    #[test]
    fn nothing_is_written_after_a_busy_answer() {
        let busy_at_3 = Settled::Busy {
            seq: 3,
            retry_after_ms: 100,
        };
        let (out, busy) = written(vec![
            Settled::Ack(1),
            Settled::Ack(2),
            busy_at_3,
            Settled::Ack(9),
        ]);
        assert!(busy);
        assert_eq!(
            out,
            vec![
                GatewayMsg::Ack { seq: 2 },
                GatewayMsg::Busy {
                    seq: 3,
                    retry_after_ms: 100
                }
            ]
        );
    }
}
