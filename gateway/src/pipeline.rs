//! The pipeline's vocabulary: what the dispatcher hands the committer ([`Item`]: a device's
//! processed event as a [`WriteSet`], a nack, a resend, a welcome, a busy answer), what each
//! item's device is told once it is durable ([`Settled`], through its [`Reply`]), and the
//! delivery [`Class`] of a forward. The ingress, the dispatcher, the committer and the outbox
//! all speak it; it depends on nothing of theirs.

use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use crate::proto::msg::NackCode;

/// How soon a forward must reach the cloud: urgent wakes the uplink at once, normal within
/// `outbox.max_delay_ms`, bulk only with others (and is dropped first when the outbox is full).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Urgent,
    Normal,
    Bulk,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Urgent => "urgent",
            Class::Normal => "normal",
            Class::Bulk => "bulk",
        }
    }

    /// The ABI's class number (0 urgent, 1 normal, 2 bulk).
    pub fn from_abi(n: i32) -> Option<Class> {
        use tidepool_abi::class::{BULK, NORMAL, URGENT};
        match n {
            URGENT => Some(Class::Urgent),
            NORMAL => Some(Class::Normal),
            BULK => Some(Class::Bulk),
            _ => None,
        }
    }

    pub fn as_abi(self) -> u8 {
        self as u8
    }
}

/// An outbox entry ready to be written.
#[derive(Debug, Clone)]
pub struct OutboxWrite {
    pub class: Class,
    /// The encoded [`crate::outbox::Entry`].
    pub entry: Vec<u8>,
    /// Its `ts` was taken on an unset clock (it carries a `boot` time): it waits for a
    /// re-stamp once the clock is set.
    pub unset_clock: bool,
}

/// Everything one processed event writes. Applied whole or not at all.
#[derive(Debug, Default, Clone)]
pub struct WriteSet {
    /// Full store keys (see [`keys::state`]); `None` deletes.
    pub state: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub outbox: Vec<OutboxWrite>,
    /// Encoded [`super::DeadLetter`]s.
    pub dead: Vec<Vec<u8>>,
    /// The overlay tag of these state writes.
    pub tag: u64,
}

/// What the device is told once an item is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Ack(u64),
    Nack {
        seq: u64,
        code: NackCode,
        reason: String,
    },
    Welcome {
        hwm: u64,
    },
    Busy {
        seq: u64,
        retry_after_ms: u64,
    },
}

pub type Reply = UnboundedSender<Settled>;

#[derive(Debug)]
pub enum ItemKind {
    /// A processed publish (or datagram when seq is 0): its effects and dead letters.
    Event(Box<WriteSet>),
    /// A publish rejected for good.
    Nack { code: NackCode, reason: String },
    /// A publish at or below the high-water mark: ack it again once durable.
    Resend,
    /// A `hello`: answer with the durable high-water mark.
    Welcome,
    /// Backpressure: settles after everything submitted before it.
    Busy { retry_after_ms: u64 },
}

impl ItemKind {
    /// Bytes this item holds while it waits for the committer (what it writes, plus a fixed
    /// share for the item itself): what the [`Backlog`] bounds.
    pub fn bytes(&self) -> u64 {
        const ITEM: u64 = 64;
        ITEM + match self {
            ItemKind::Event(ws) => {
                let state: usize = ws
                    .state
                    .iter()
                    .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                    .sum();
                let outbox: usize = ws.outbox.iter().map(|r| r.entry.len()).sum();
                let dead: usize = ws.dead.iter().map(Vec::len).sum();
                (state + outbox + dead) as u64
            }
            ItemKind::Nack { reason, .. } => reason.len() as u64,
            ItemKind::Resend | ItemKind::Welcome | ItemKind::Busy { .. } => 0,
        }
    }

    /// Whether this item, once durable, moves its device's high-water mark to its seq: a kept
    /// event or a nacked publish does; a bad frame, a welcome or a busy answer does not.
    pub fn moves_mark(&self) -> bool {
        match self {
            ItemKind::Event(_) | ItemKind::Resend => true,
            ItemKind::Nack { code, .. } => code.moves_mark(),
            ItemKind::Welcome | ItemKind::Busy { .. } => false,
        }
    }
}

#[derive(Debug)]
pub struct Item {
    pub device: Arc<str>,
    /// 0 when the item has no seq (datagrams, frames without one).
    pub seq: u64,
    pub kind: ItemKind,
    pub reply: Option<Reply>,
}
