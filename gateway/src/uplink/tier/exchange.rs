//! The Tidepool sink's bookkeeping (pure: no I/O, no clock): which tier seq each entry of a
//! batch carries, and what the upstream's answers on one stream settle.
//!
//! The upstream treats a publish at or below its high-water mark for this gateway as a resend:
//! acked and never run. So a tier seq is given once per entry, when the entry is first sent,
//! above every seq given before and above the upstream's mark ([`assign`]); it is written into
//! the entry before the send and reused by every resend, and entries go in seq order. Sending
//! urgent entries first then cannot turn the normal entries behind them into "resends": they
//! get their seqs when they are sent, after the urgent ones.

use crate::proto::msg::GatewayMsg;

/// The tier seq of each entry of a batch, in batch order: an entry keeps the seq it has; the
/// others get the next seqs in batch order, above `floor` (the highest of the upstream's mark
/// and every seq given before). Returns the seqs and how many were new; `None` when the seq
/// space above `floor` is used up (an upstream mark near 2^64).
pub fn assign(current: &[Option<u64>], floor: u64) -> Option<(Vec<u64>, usize)> {
    let mut next = floor;
    let mut new = 0;
    let mut seqs = Vec::with_capacity(current.len());
    for c in current {
        seqs.push(match c {
            Some(s) => *s,
            None => {
                next = next.checked_add(1)?;
                new += 1;
                next
            }
        });
    }
    Some((seqs, new))
}

/// What a settled batch comes to, given the entries refused (nacked, or too large to send).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// The upstream took the others (or holds them from an earlier attempt).
    DeliveredExcept(Vec<(usize, String)>),
    /// Every entry was refused: nothing of the batch ran upstream. Not proof that these
    /// events are bad (an ACL or limit changed upstream refuses everything): the uplink's plan
    /// judges them as it judges a cloud's refusals, after their seqs are freed.
    AllRefused(String),
}

pub fn verdict(entries: usize, refused: Vec<(usize, String)>) -> Verdict {
    match refused.len() {
        0 => Verdict::Delivered,
        n if n >= entries => Verdict::AllRefused(refused[0].1.clone()),
        _ => Verdict::DeliveredExcept(refused),
    }
}

/// What one stream settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every publish was acked or nacked: `refused` holds the nacked ones (batch index, why).
    Settled { refused: Vec<(usize, String)> },
    /// Not everything was answered (busy, or the stream ended early): send the batch again;
    /// what the upstream kept is below its mark by then and is not sent twice.
    Unsettled(String),
}

/// The answers to the publishes of one stream.
#[derive(Debug)]
pub struct Exchange {
    /// (tier seq, batch index) of what was sent, rising by seq.
    sent: Vec<(u64, usize)>,
    /// The highest cumulative ack.
    acked: u64,
    refused: Vec<(usize, String)>,
    busy: Option<(u64, u64)>,
}

/// An answer the device protocol does not allow: the upstream is not speaking it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the upstream broke the protocol: {0}")]
pub struct Violation(pub String);

/// What of an upstream's nack reason is kept in the outbox entry and the dead letter.
pub const REASON_BYTES: usize = 256;

/// `reason` cut to [`REASON_BYTES`] (on a character boundary), marked when cut.
fn clip(reason: &str) -> std::borrow::Cow<'_, str> {
    if reason.len() <= REASON_BYTES {
        return reason.into();
    }
    let end = (0..=REASON_BYTES)
        .rev()
        .find(|&i| reason.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}…", &reason[..end]).into()
}

impl Exchange {
    /// `sent`: (tier seq, batch index) of each publish, in the order sent (rising seqs).
    pub fn new(sent: Vec<(u64, usize)>) -> Exchange {
        debug_assert!(sent.windows(2).all(|w| w[0].0 < w[1].0));
        Exchange {
            sent,
            acked: 0,
            refused: Vec::new(),
            busy: None,
        }
    }

    fn index_of(&self, seq: u64) -> Option<usize> {
        self.sent
            .binary_search_by_key(&seq, |(s, _)| *s)
            .ok()
            .map(|i| self.sent[i].1)
    }

    /// One answer from the upstream; for a nack, the entry refused (batch index, why).
    pub fn on(&mut self, msg: GatewayMsg) -> Result<Option<(usize, String)>, Violation> {
        match msg {
            GatewayMsg::Ack { seq } => self.acked = self.acked.max(seq),
            GatewayMsg::Nack { seq, code, reason } => {
                let Some(i) = self.index_of(seq) else {
                    return Err(Violation(format!(
                        "a nack for seq {seq}, which was not sent"
                    )));
                };
                // A publish is nacked once: a repeat is a hostile upstream making this
                // gateway rewrite and sync its outbox entry again and again.
                if self.refused.iter().any(|(r, _)| *r == i) {
                    return Err(Violation(format!("a second nack for seq {seq}")));
                }
                let why = format!("upstream nack {}: {}", code.as_str(), clip(&reason));
                self.refused.push((i, why.clone()));
                return Ok(Some((i, why)));
            }
            GatewayMsg::Busy {
                seq,
                retry_after_ms,
            } => self.busy = Some((seq, retry_after_ms)),
            GatewayMsg::Welcome { .. } => {
                return Err(Violation("a second welcome".into()));
            }
        }
        Ok(None)
    }

    /// The upstream finished the stream: what it settled. A publish is answered by an ack at
    /// or above its seq, or by its nack (no ack covers a nacked last publish).
    pub fn finish(mut self) -> Outcome {
        if let Some((seq, after)) = self.busy {
            return Outcome::Unsettled(format!(
                "the upstream is busy from seq {seq} (retry after {after} ms)"
            ));
        }
        let open = self
            .sent
            .iter()
            .filter(|(s, i)| *s > self.acked && !self.refused.iter().any(|(r, _)| r == i))
            .count();
        if open > 0 {
            return Outcome::Unsettled(format!(
                "the upstream ended the stream with {open} publishes unanswered"
            ));
        }
        // One nack per publish (a second is a violation): no duplicates to drop.
        self.refused.sort();
        Outcome::Settled {
            refused: self.refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::msg::NackCode;

    #[test]
    fn new_entries_get_seqs_above_the_floor_in_batch_order_and_old_ones_keep_theirs() {
        assert_eq!(assign(&[None, None, None], 0), Some((vec![1, 2, 3], 3)));
        assert_eq!(
            assign(&[Some(4), Some(5), None], 7),
            Some((vec![4, 5, 8], 1))
        );
        assert_eq!(assign(&[Some(9)], 20), Some((vec![9], 0)));
        assert_eq!(assign(&[None], u64::MAX), None, "no seq above 2^64-1");
        assert_eq!(assign(&[Some(3)], u64::MAX), Some((vec![3], 0)));
    }

    #[test]
    fn a_batch_refused_whole_is_not_proof_against_its_events() {
        let r = |i: usize| (i, format!("nack {i}"));
        assert_eq!(verdict(3, vec![]), Verdict::Delivered);
        assert_eq!(verdict(3, vec![r(1)]), Verdict::DeliveredExcept(vec![r(1)]));
        assert_eq!(
            verdict(2, vec![r(0), r(1)]),
            Verdict::AllRefused("nack 0".into())
        );
    }

    /// The rule behind tier seqs, on a model of the upstream's resend check: outbox order is
    /// normal then urgent; urgent goes first. Seqs given at send time reach the upstream
    /// rising, so nothing is taken for a resend; seqs given in outbox order would lose the
    /// normal entries (this is what the rule is for).
    #[test]
    fn urgent_first_does_not_turn_later_entries_into_resends() {
        // Outbox seqs 1..=3 normal, 4..=5 urgent; the uplink sends [4, 5] then [1, 2, 3].
        let parts: [&[u64]; 2] = [&[4, 5], &[1, 2, 3]];
        let upstream_runs = |seq_of: &dyn Fn(u64, &mut u64) -> u64| {
            let (mut hwm, mut ran, mut highest) = (0u64, Vec::new(), 0u64);
            for part in parts {
                for &o in part {
                    let s = seq_of(o, &mut highest);
                    if s > hwm {
                        hwm = s;
                        ran.push(o);
                    }
                }
            }
            ran
        };
        let at_send = upstream_runs(&|_, highest| {
            let (seqs, _) = assign(&[None], *highest).unwrap();
            *highest = seqs[0];
            seqs[0]
        });
        assert_eq!(at_send, vec![4, 5, 1, 2, 3]);
        let by_outbox_order = upstream_runs(&|o, _| o);
        assert_eq!(by_outbox_order, vec![4, 5], "the model shows the loss");
    }

    fn nack(seq: u64) -> GatewayMsg {
        GatewayMsg::Nack {
            seq,
            code: NackCode::Acl,
            reason: "no".into(),
        }
    }

    #[test]
    fn acked_and_nacked_publishes_settle_the_stream() {
        let mut x = Exchange::new(vec![(7, 0), (8, 1), (9, 2)]);
        x.on(nack(8)).unwrap();
        x.on(GatewayMsg::Ack { seq: 9 }).unwrap();
        assert_eq!(
            x.finish(),
            Outcome::Settled {
                refused: vec![(1, "upstream nack acl: no".into())]
            }
        );
    }

    /// No ack covers a nacked last publish: the batch is settled all the same.
    #[test]
    fn a_nacked_last_publish_settles_the_stream() {
        let mut x = Exchange::new(vec![(1, 0), (2, 1)]);
        x.on(GatewayMsg::Ack { seq: 1 }).unwrap();
        assert_eq!(
            x.on(nack(2)).unwrap(),
            Some((1, "upstream nack acl: no".into()))
        );
        assert_eq!(
            x.finish(),
            Outcome::Settled {
                refused: vec![(1, "upstream nack acl: no".into())]
            }
        );
    }

    #[test]
    fn busy_or_missing_acks_leave_the_batch_unsettled() {
        let mut x = Exchange::new(vec![(1, 0), (2, 1)]);
        x.on(GatewayMsg::Ack { seq: 1 }).unwrap();
        x.on(GatewayMsg::Busy {
            seq: 2,
            retry_after_ms: 1000,
        })
        .unwrap();
        assert!(matches!(x.finish(), Outcome::Unsettled(_)));
        let mut x = Exchange::new(vec![(1, 0), (2, 1)]);
        x.on(GatewayMsg::Ack { seq: 1 }).unwrap();
        assert!(matches!(x.finish(), Outcome::Unsettled(_)));
    }

    #[test]
    fn answers_the_protocol_does_not_allow_are_violations() {
        let mut x = Exchange::new(vec![(1, 0)]);
        assert!(x.on(nack(5)).is_err());
        // One nack per publish: a repeat would have the entry rewritten and synced each time.
        assert!(x.on(nack(1)).is_ok());
        assert_eq!(
            x.on(nack(1)),
            Err(Violation("a second nack for seq 1".into()))
        );
        assert!(x
            .on(GatewayMsg::Welcome {
                hwm: 0,
                max_frame_bytes: 1
            })
            .is_err());
    }

    /// An upstream's reason is kept to 256 bytes (it is written into the outbox entry).
    #[test]
    fn a_long_nack_reason_is_clipped_on_a_character_boundary() {
        let mut x = Exchange::new(vec![(1, 0)]);
        let long = "é".repeat(1000);
        let (_, why) = x
            .on(GatewayMsg::Nack {
                seq: 1,
                code: NackCode::Acl,
                reason: long,
            })
            .unwrap()
            .unwrap();
        assert!(why.len() <= REASON_BYTES + 40, "{}", why.len());
        assert!(why.ends_with("é…"), "{why}");
    }

    #[test]
    fn an_empty_stream_is_settled() {
        assert_eq!(
            Exchange::new(vec![]).finish(),
            Outcome::Settled { refused: vec![] }
        );
    }
}
