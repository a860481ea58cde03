//! The dispatcher's own thread. It owns the [`Dispatcher`] (`&mut`: "one event at a time, in
//! commit order" needs no lock), takes what the ingress and the control socket send through an
//! [`Inbox`], and fires the handlers' timers when they fall due (`recv_timeout` until the next
//! due time). Nothing on the tokio runtime runs a handler or waits for the committer: a stream
//! hands over the frames of each read as one [`Batch`] and reads on; the frames waiting for
//! this thread are bounded in bytes (`ingress.queue_bytes`): when the room is taken, streams
//! stop reading (QUIC's flow control then holds the devices back) and datagrams are shed. A
//! batch that ends in `busy` (or is dropped) halts its stream's [`Gate`]: the stream stops
//! reading and its later batches are dropped unread.
//!
//! Supersede is a session number: the ingress announces each connection ([`Inbox::connected`])
//! before it reads a frame, and a batch or datagram of any other session than the device's
//! latest is dropped unread (the device resends it on its new connection), so a superseded
//! session can never claim a seq the new one was told is free.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use super::turns::{Turns, TURN_STEPS, TURN_TIME};
use super::{Dispatcher, Fault, HandlerStatus, Submitted};
use crate::pipeline::Reply;
use crate::proto::msg::{NackCode, Publish};

/// One frame of a stream, decoded and checked for what only the stream knows (its seq order,
/// its publishing slot).
#[derive(Debug)]
pub enum Step {
    Hello,
    Publish(Publish),
    /// Refused before dispatch (not a valid publish, or a seq not above the stream's last).
    Nack {
        seq: u64,
        code: NackCode,
        reason: String,
    },
    /// Answered busy; the stream stops. Another stream of the device holds the publishing
    /// slot (`retry_after_ms` `None`: the configured wait), or the device is past its rate
    /// (the wait until it may go on).
    Busy {
        seq: u64,
        retry_after_ms: Option<u64>,
    },
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchEnd {
    /// Every step was taken: read on.
    Taken,
    /// A step was answered busy and the steps after it were not taken: stop reading.
    Busy,
    /// Nothing was taken (the session was superseded, or the dispatcher stopped): stop reading.
    Dropped,
}

/// What one stream's batches share with the dispatcher: halted once a batch of it ended in
/// `busy` or was dropped. Later batches of the stream are then dropped unread, and the stream
/// (woken) stops reading.
#[derive(Debug, Default)]
pub struct Gate {
    halted: AtomicBool,
    woken: Notify,
}

impl Gate {
    pub fn is_halted(&self) -> bool {
        self.halted.load(Ordering::Acquire)
    }

    fn halt(&self) {
        self.halted.store(true, Ordering::Release);
        self.woken.notify_one();
    }

    /// Waits until the gate is halted (one waiter: the stream's reader).
    pub async fn halted(&self) {
        while !self.is_halted() {
            self.woken.notified().await;
        }
    }
}

/// The steps one read of a stream produced, in order, and where their answers go.
pub struct Batch {
    pub session: u64,
    pub device: Arc<str>,
    pub steps: Vec<Step>,
    /// When the frames were read.
    pub received: crate::clock::Stamp,
    pub reply: Reply,
    pub gate: Arc<Gate>,
}

enum Input {
    Connected {
        device: Arc<str>,
        session: u64,
    },
    Disconnected {
        device: Arc<str>,
        session: u64,
    },
    Batch {
        batch: Batch,
        /// Its share of the room, given back when the input is dropped (after it was taken).
        room: Room,
    },
    Datagram {
        session: u64,
        device: Arc<str>,
        publish: Publish,
        received: crate::clock::Stamp,
        /// Its share of the room, given back when the input is dropped (after it was taken).
        room: Room,
    },
    Status(oneshot::Sender<Vec<HandlerStatus>>),
    Install(Box<Install>, oneshot::Sender<Result<Option<u64>, String>>),
    Remove(String, oneshot::Sender<Option<u64>>),
    Unload(String, oneshot::Sender<Option<u64>>),
    /// A new `acl.publish` (a reload, a config bundle).
    Acl(Vec<String>),
    Stop,
}

/// A handler to load (run its `tp_init`) and install between two turns: loaded on the
/// dispatcher's thread, so `tp_init` reads the state as the next event will.
pub struct Install {
    pub manifest: crate::sandbox::Manifest,
    /// Compiled (and checked against the ABI) with `runtime`'s engine, off this thread.
    pub runtime: crate::sandbox::Runtime,
    pub module: wasmi::Module,
    pub env: crate::sandbox::HostEnv,
    /// Its state bytes in the store (its `state_bytes` quota starts there).
    pub state_used: u64,
    /// The probation it starts on (`None`: none, as after a rollback).
    pub probation: Option<crate::sandbox::probation::Rules>,
    /// Its `[[handler]]` entry's `config` overrides (none for a bundle).
    pub overrides: std::collections::BTreeMap<String, String>,
}

/// An input's room: its permits of the whole inbox, and of its connection's share of it.
struct Room {
    inbox: OwnedSemaphorePermit,
    _connection: OwnedSemaphorePermit,
}

impl Room {
    /// Permits of the whole inbox it holds.
    fn held(&self) -> usize {
        self.inbox.num_permits()
    }
}

/// What one step holds in memory besides its frame's bytes (the step itself, a nack's reason,
/// allocation slack): charged against the room with each frame, so that a flood of tiny
/// frames is bounded in memory too, not only in bytes read.
pub const STEP_BYTES: usize = std::mem::size_of::<Step>() + 64;

/// The dispatcher thread has stopped (the gateway is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// The way into the dispatcher's thread; cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    tx: Sender<Input>,
    room: Arc<Semaphore>,
    capacity: u32,
}

impl Inbox {
    /// A new session of `device` (ids rise): from now on only its frames are taken.
    pub fn connected(&self, device: &Arc<str>, session: u64) {
        let device = device.clone();
        let _ = self.tx.send(Input::Connected { device, session });
    }

    /// The session ended (its streams are done): forgotten unless a newer one registered.
    pub fn disconnected(&self, device: &Arc<str>, session: u64) {
        let device = device.clone();
        let _ = self.tx.send(Input::Disconnected { device, session });
    }

    /// The room one connection may hold at once: a quarter of the inbox (at least one read of
    /// a stream), so that one device flooding leaves room for the others.
    pub fn connection_share(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.connection_capacity() as usize))
    }

    /// The most bytes (frames and their steps) one batch may be charged: a connection's share.
    pub fn connection_bytes(&self) -> usize {
        self.connection_capacity() as usize
    }

    fn connection_capacity(&self) -> u32 {
        (self.capacity / 4).max(64 * 1024).min(self.capacity)
    }

    /// Waits for room for `bytes` of frames (at most the whole room) in the connection's
    /// share (`connection`, from [`Inbox::connection_share`]) and in the inbox, then hands
    /// `batch` over (its answers go to its reply; a busy answer or a drop halts its gate).
    pub async fn dispatch(
        &self,
        batch: Batch,
        bytes: usize,
        connection: &Arc<Semaphore>,
    ) -> Result<(), Stopped> {
        let own = connection
            .clone()
            .acquire_many_owned(self.share(bytes).min(self.connection_capacity()))
            .await
            .map_err(|_| Stopped)?;
        let inbox = self
            .room
            .clone()
            .acquire_many_owned(self.share(bytes))
            .await
            .map_err(|_| Stopped)?;
        let room = Room {
            inbox,
            _connection: own,
        };
        let input = Input::Batch { batch, room };
        self.tx.send(input).map_err(|_| Stopped)
    }

    /// Whether less than half the inbox is free: the dispatcher's thread is behind, and
    /// datagrams are shed.
    pub fn is_half_full(&self) -> bool {
        self.room.available_permits() < self.capacity as usize / 2
    }

    /// Hands a datagram over if there is room for it now, in the connection's share and in
    /// the inbox; `false`: shed. (The caller sheds it first while [`Inbox::is_half_full`]: the
    /// inbox fills only when the dispatcher's thread is behind, so datagrams are shed on CPU
    /// there, and on the commit backlog in the dispatcher, before a publish ever waits.)
    pub fn datagram(
        &self,
        (session, connection): (u64, &Arc<Semaphore>),
        device: &Arc<str>,
        p: Publish,
        received: crate::clock::Stamp,
    ) -> bool {
        let bytes = p.payload.len() + p.topic.len() + STEP_BYTES;
        let share = self.share(bytes);
        let Ok(own) = connection
            .clone()
            .try_acquire_many_owned(share.min(self.connection_capacity()))
        else {
            return false;
        };
        let Ok(inbox) = self.room.clone().try_acquire_many_owned(share) else {
            return false;
        };
        let room = Room {
            inbox,
            _connection: own,
        };
        let input = Input::Datagram {
            session,
            device: device.clone(),
            publish: p,
            received,
            room,
        };
        self.tx.send(input).is_ok()
    }

    /// Loads and installs a handler between two turns (see [`Dispatcher::install`]): the
    /// version it replaced, or why it was not loaded (nothing changed then).
    pub async fn install(&self, install: Install) -> Result<Result<Option<u64>, String>, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Install(Box::new(install), tx))
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Removes a handler between two turns, with what its name holds (see
    /// [`Dispatcher::remove`]): the version removed, if one ran.
    pub async fn remove(&self, name: &str) -> Result<Option<u64>, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Remove(name.to_string(), tx))
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Takes a handler out between two turns, leaving what its name holds (see
    /// [`Dispatcher::unload`]): the version unloaded, if one ran.
    pub async fn unload(&self, name: &str) -> Result<Option<u64>, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Unload(name.to_string(), tx))
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Puts a new `acl.publish` in force from the next event on.
    pub fn set_acl(&self, publish: Vec<String>) {
        let _ = self.tx.send(Input::Acl(publish));
    }

    /// Each handler's status, as soon as the dispatcher thread is between two turns.
    pub async fn status(&self) -> Result<Vec<HandlerStatus>, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Input::Status(tx)).map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Stops the thread once it has taken what is queued before this.
    pub fn stop(&self) {
        let _ = self.tx.send(Input::Stop);
    }

    /// The permits `bytes` of frames take (never more than the whole room, or one read larger
    /// than the room would wait forever).
    fn share(&self, bytes: usize) -> u32 {
        u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.capacity)
    }
}

/// Starts the dispatcher's thread with `queue_bytes` of room for frames.
pub fn spawn(
    dispatcher: Dispatcher,
    queue_bytes: u32,
) -> std::io::Result<(Inbox, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let capacity = queue_bytes.max(1);
    let inbox = Inbox {
        tx,
        room: Arc::new(Semaphore::new(capacity as usize)),
        capacity,
    };
    let room = inbox.room.clone();
    let thread = std::thread::Builder::new()
        .name("dispatcher".into())
        .spawn(move || run(dispatcher, rx, room, capacity))?;
    Ok((inbox, thread))
}

/// Each device's latest session: only its frames are taken.
#[derive(Debug, Default)]
pub struct Sessions {
    latest: HashMap<Arc<str>, u64>,
}

impl Sessions {
    /// A new session of `device` supersedes the ones before.
    pub fn connected(&mut self, device: Arc<str>, session: u64) {
        self.latest.insert(device, session);
    }

    /// The session ended: forgotten unless a newer one registered.
    pub fn disconnected(&mut self, device: &Arc<str>, session: u64) {
        if self.latest.get(device) == Some(&session) {
            self.latest.remove(device);
        }
    }

    /// Whether input of `device` from `session` is taken.
    pub fn is_latest(&self, device: &Arc<str>, session: u64) -> bool {
        self.latest.get(device) == Some(&session)
    }

    /// Takes `batch` through `d` if its session is the device's latest and its stream was not
    /// halted; drops it unread if not. A busy answer or a drop halts the stream's gate.
    /// `queued`: whether other input waits behind this batch (for the fair CPU share).
    pub fn take(
        &self,
        d: &mut Dispatcher,
        mut batch: Batch,
        queued: bool,
    ) -> Result<BatchEnd, Fault> {
        let mut steps = std::mem::take(&mut batch.steps).into_iter();
        self.take_some(d, &batch, &mut steps, queued, None)
    }

    /// Takes the `steps` left of `batch` (as [`Sessions::take`]) until `turn` (a step count
    /// and a deadline) is over; the steps not taken stay in the iterator (none are copied: a
    /// long batch costs one pass however many turns it takes). `Taken` with steps left: its
    /// device's next turn goes on with them.
    pub fn take_some(
        &self,
        d: &mut Dispatcher,
        batch: &Batch,
        steps: &mut std::vec::IntoIter<Step>,
        queued: bool,
        turn: Option<(usize, Instant)>,
    ) -> Result<BatchEnd, Fault> {
        let gate = &batch.gate;
        let end = match self.is_latest(&batch.device, batch.session) && !gate.is_halted() {
            true => take(d, batch, steps, queued, turn)?,
            false => BatchEnd::Dropped,
        };
        if end != BatchEnd::Taken {
            gate.halt();
        }
        Ok(end)
    }
}

/// Input waiting for its device's turn.
enum Work {
    Batch {
        /// The batch (its steps moved out into `steps`).
        batch: Batch,
        steps: std::vec::IntoIter<Step>,
        room: Room,
    },
    Datagram {
        session: u64,
        publish: Publish,
        received: crate::clock::Stamp,
        room: Room,
    },
}

/// The loop: timers when due; each device's input in the order it was sent, devices taking
/// turns ([`Turns`]), until `Stop` (and what was queued before it is taken); then the
/// dispatcher closes (the committer finishes what it has and exits).
fn run(mut d: Dispatcher, rx: Receiver<Input>, inbox_room: Arc<Semaphore>, capacity: u32) {
    let mut sessions = Sessions::default();
    let mut turns: Turns<Work> = Turns::default();
    let mut stopping = false;
    // Frames handed over and not taken yet, beyond `held` permits of the input in hand.
    let queued = |held: usize| inbox_room.available_permits() + held < capacity as usize;
    loop {
        // Waits (firing timers meanwhile) only when no device has input queued.
        if turns.is_empty() {
            if stopping {
                break;
            }
            match wait(&mut d, &rx, &queued) {
                Some(input) => stopping |= accept(&mut d, &mut sessions, &mut turns, input),
                None => break,
            }
        }
        // Then takes whatever else was sent, without waiting.
        loop {
            match rx.try_recv() {
                Ok(input) => stopping |= accept(&mut d, &mut sessions, &mut turns, input),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    stopping = true;
                    break;
                }
            }
        }
        // Timers that are due, then one turn: timers that are always late cannot starve the
        // devices, nor the reverse.
        // The clock is read for a stamp only when a timer fires (two locks).
        if d.next_timer()
            .is_some_and(|due| due <= crate::clock::now_ms())
        {
            d.set_work_waiting(queued(0));
            d.fire_timers(crate::clock::stamp());
        }
        d.set_mono(crate::clock::mono_ms());
        d.report_probations();
        let Some((device, work)) = turns.next() else {
            continue;
        };
        match work {
            Work::Batch {
                batch,
                mut steps,
                room,
            } => {
                let held = room.held();
                let turn = (TURN_STEPS, Instant::now() + TURN_TIME);
                match sessions.take_some(&mut d, &batch, &mut steps, queued(held), Some(turn)) {
                    Ok(BatchEnd::Taken) if !steps.as_slice().is_empty() => {
                        let rest = Work::Batch { batch, steps, room };
                        turns.put_back(&device, rest);
                    }
                    Ok(_) => {}
                    Err(f) => crate::store::fatal("the dispatcher", f),
                }
            }
            Work::Datagram {
                session,
                publish,
                received,
                room,
            } => {
                d.set_work_waiting(queued(room.held()));
                match sessions.is_latest(&device, session) {
                    true => d.datagram(&device, publish, received),
                    false => d.datagram_dropped(),
                }
            }
        }
    }
    d.close();
}

/// Waits for the next input, firing timers when they fall due; `None` when every sender is
/// gone.
fn wait(d: &mut Dispatcher, rx: &Receiver<Input>, queued: &dyn Fn(usize) -> bool) -> Option<Input> {
    loop {
        let Some(due) = d.next_timer() else {
            return rx.recv().ok();
        };
        let due = match due <= crate::clock::now_ms() {
            true => {
                d.set_mono(crate::clock::mono_ms());
                d.set_work_waiting(queued(0));
                d.fire_timers(crate::clock::stamp()).unwrap_or(u64::MAX)
            }
            false => due,
        };
        // Never longer than a period: a clock set back meanwhile is seen (and the due times
        // brought back within a period of it) in time.
        let longest = d.shortest_timer_period().unwrap_or(u64::MAX);
        let wait = due.saturating_sub(crate::clock::now_ms()).min(longest);
        match rx.recv_timeout(Duration::from_millis(wait)) {
            Ok(i) => return Some(i),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// Takes one input in: sessions change at once, status is answered at once, frames wait for
/// their device's turn. Returns whether it was `Stop`.
fn accept(
    d: &mut Dispatcher,
    sessions: &mut Sessions,
    turns: &mut Turns<Work>,
    input: Input,
) -> bool {
    match input {
        Input::Connected { device, session } => {
            d.session_started(&device);
            sessions.connected(device, session)
        }
        Input::Disconnected { device, session } => sessions.disconnected(&device, session),
        Input::Batch { mut batch, room } => {
            let device = batch.device.clone();
            let steps = std::mem::take(&mut batch.steps).into_iter();
            turns.push(&device, Work::Batch { batch, steps, room });
        }
        Input::Datagram {
            session,
            device,
            publish,
            received,
            room,
        } => turns.push(
            &device,
            Work::Datagram {
                session,
                publish,
                received,
                room,
            },
        ),
        Input::Status(tx) => {
            // A probation whose time is up ends before it is shown.
            d.set_mono(crate::clock::mono_ms());
            d.report_probations();
            let _ = tx.send(d.handler_status());
        }
        Input::Install(i, tx) => {
            let Install {
                manifest,
                runtime,
                module,
                env,
                state_used,
                probation,
                overrides,
            } = *i;
            let loaded = crate::sandbox::Handler::instantiate_module(
                &runtime, module, manifest, &overrides, env, state_used,
            );
            let (now, mono) = (crate::clock::now_ms(), crate::clock::mono_ms());
            let answer = match loaded {
                Err(e) => Err(e.to_string()),
                Ok(mut h) => {
                    h.probation =
                        probation.map(|r| crate::sandbox::probation::Probation::new(r, mono));
                    match d.install(h, now) {
                        Ok(before) => Ok(before),
                        Err(f) => crate::store::fatal("installing a handler", f),
                    }
                }
            };
            let _ = tx.send(answer);
        }
        Input::Remove(name, tx) => {
            let removed = d
                .remove(&name)
                .unwrap_or_else(|f| crate::store::fatal("removing a handler", f));
            let _ = tx.send(removed);
        }
        Input::Unload(name, tx) => {
            let _ = tx.send(d.unload(&name));
        }
        Input::Acl(publish) => d.set_acl(publish),
        Input::Stop => return true,
    }
    false
}

/// Takes a batch's steps in order; a busy answer ends it.
fn take(
    d: &mut Dispatcher,
    b: &Batch,
    steps: &mut std::vec::IntoIter<Step>,
    queued: bool,
    turn: Option<(usize, Instant)>,
) -> Result<BatchEnd, Fault> {
    let (device, reply) = (&b.device, &b.reply);
    // Contention is other input queued (more frames of this read are not: a box that keeps
    // up reads several at a time).
    d.set_work_waiting(queued);
    for (i, step) in steps.by_ref().enumerate() {
        let taken = i + 1;
        match step {
            Step::Hello => d.hello(device, reply),
            Step::Nack { seq, code, reason } => d.nack(device, seq, code, reason, reply)?,
            Step::Busy {
                seq,
                retry_after_ms,
            } => {
                d.busy(device, seq, retry_after_ms, reply)?;
                return Ok(BatchEnd::Busy);
            }
            Step::Publish(p) => {
                let seq = p.seq;
                if d.publish(device, p, b.received, reply)? == Submitted::Busy {
                    d.busy(device, seq, None, reply)?;
                    return Ok(BatchEnd::Busy);
                }
            }
        }
        // The turn is over: the rest waits for the device's next one.
        if turn.is_some_and(|(most, until)| taken >= most || Instant::now() >= until) {
            break;
        }
    }
    Ok(BatchEnd::Taken)
}
