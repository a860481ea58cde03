//! Which connection attempts get a handshake (pure: counts in, a decision out; no socket, no
//! clock). A handshake is work anyone can make the gateway start, with no certificate and
//! from an address they may spoof, so handshakes have their own budget, apart from the device
//! connections:
//!
//! - at most `max_handshakes` in flight; past it an attempt is refused (a stateless answer);
//! - an attempt from an address that has not proved it receives our packets gets a QUIC Retry
//!   (stateless too) once a quarter of that budget is in use, or when its address already has
//!   a handshake in flight: a spoofed address never comes back, so a spoofer holds at most one
//!   slot per address it forges (and only while the budget is mostly free), and cannot fill
//!   the share of an address it does not own;
//! - at most `max_handshakes_per_address` in flight from one IPv4 address or one IPv6 /64,
//!   counting proved attempts (and the one unproved attempt an idle address may start);
//! - each handshake has `handshake_timeout_ms` (enforced by the connection task, `conn.rs`).
//!
//! Device connections are counted only once the handshake and the role check passed, against
//! `max_connections`, and a superseded connection stops counting at once (it settles apart).

use std::collections::HashMap;
use std::net::IpAddr;

/// What to do with a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the handshake (a slot is taken: give it back with [`Handshakes::done`]).
    Accept,
    /// Answer with a Retry: the client must show it owns its address.
    Retry,
    /// Refuse, and why.
    Refuse(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` devices are connected.
    Connections,
    /// `max_handshakes` handshakes are in flight.
    Handshakes,
    /// `max_handshakes_per_address` handshakes are in flight from this address.
    Address,
}

impl Refusal {
    pub fn setting(self) -> &'static str {
        match self {
            Refusal::Connections => "ingress.max_connections",
            Refusal::Handshakes => "ingress.max_handshakes",
            Refusal::Address => "ingress.max_handshakes_per_address",
        }
    }
}

/// The handshakes in flight, in all and per address.
#[derive(Debug)]
pub struct Handshakes {
    in_flight: usize,
    per_address: HashMap<IpAddr, u32>,
    max: usize,
    max_per_address: u32,
}

impl Handshakes {
    pub fn new(max: usize, max_per_address: u32) -> Handshakes {
        Handshakes {
            in_flight: 0,
            per_address: HashMap::new(),
            max: max.max(1),
            max_per_address: max_per_address.max(1),
        }
    }

    /// Handshakes in flight from which unvalidated addresses get a Retry.
    fn retry_from(&self) -> usize {
        self.max / 4
    }

    /// Decides on an attempt from `ip` (`validated`: its address was proved by a Retry
    /// token), with `devices` of `max_devices` device connections counted.
    pub fn decide(
        &mut self,
        ip: IpAddr,
        validated: bool,
        devices: usize,
        max_devices: usize,
    ) -> Decision {
        if devices >= max_devices {
            return Decision::Refuse(Refusal::Connections);
        }
        if self.in_flight >= self.max {
            return Decision::Refuse(Refusal::Handshakes);
        }
        let k = key(ip);
        let here = self.per_address.get(&k).copied().unwrap_or(0);
        if !validated && (here > 0 || self.in_flight >= self.retry_from()) {
            return Decision::Retry;
        }
        if here >= self.max_per_address {
            return Decision::Refuse(Refusal::Address);
        }
        *self.per_address.entry(k).or_default() += 1;
        self.in_flight += 1;
        Decision::Accept
    }

    /// A handshake from `ip` that was accepted ended (done, failed or timed out).
    pub fn done(&mut self, ip: IpAddr) {
        let k = key(ip);
        if let Some(n) = self.per_address.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&k);
            }
            self.in_flight -= 1;
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// The address an attempt counts against: an IPv4 address, or an IPv6 /64 (one host's
/// usual share; an IPv4-mapped address counts as its IPv4 address).
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn handshakes_have_their_own_budget_apart_from_the_devices() {
        let mut h = Handshakes::new(8, 8);
        // Devices full: refused whatever the handshakes.
        assert_eq!(
            h.decide(ip("10.0.0.1"), true, 4, 4),
            Decision::Refuse(Refusal::Connections)
        );
        for _ in 0..8 {
            assert_eq!(h.decide(ip("10.0.0.1"), true, 0, 4), Decision::Accept);
        }
        assert_eq!(
            h.decide(ip("10.0.0.2"), true, 0, 4),
            Decision::Refuse(Refusal::Handshakes)
        );
        h.done(ip("10.0.0.1"));
        assert_eq!(h.decide(ip("10.0.0.2"), true, 0, 4), Decision::Accept);
        assert_eq!(h.in_flight(), 8);
    }

    #[test]
    fn under_load_an_unproved_address_gets_a_retry_and_holds_nothing() {
        let mut h = Handshakes::new(8, 8);
        // Below a quarter in use: accepted without a Retry (no extra round trip).
        assert_eq!(h.decide(ip("10.0.0.1"), false, 0, 100), Decision::Accept);
        assert_eq!(h.decide(ip("10.0.0.2"), false, 0, 100), Decision::Accept);
        for _ in 0..100 {
            assert_eq!(h.decide(ip("10.0.0.9"), false, 0, 100), Decision::Retry);
        }
        assert_eq!(h.in_flight(), 2);
        // The same address, proved: accepted.
        assert_eq!(h.decide(ip("10.0.0.9"), true, 0, 100), Decision::Accept);
    }

    /// Forged attempts from a victim's address (a site's NAT, an IPv6 /64) cannot use up its
    /// share: only the first unproved one holds a slot, the rest get a Retry, and the victim,
    /// which answers the Retry, gets in.
    #[test]
    fn a_spoofer_cannot_fill_the_share_of_an_address_it_does_not_own() {
        let mut h = Handshakes::new(256, 2);
        assert_eq!(h.decide(ip("192.0.2.7"), false, 0, 100), Decision::Accept);
        for _ in 0..1000 {
            assert_eq!(h.decide(ip("192.0.2.7"), false, 0, 100), Decision::Retry);
        }
        assert_eq!(h.decide(ip("192.0.2.7"), true, 0, 100), Decision::Accept);
        // Proved attempts of its own are what the per-address cap holds back.
        assert_eq!(
            h.decide(ip("192.0.2.7"), true, 0, 100),
            Decision::Refuse(Refusal::Address)
        );
        assert_eq!(h.in_flight(), 2);
    }

    #[test]
    fn one_address_or_one_ipv6_64_holds_at_most_its_share() {
        let mut h = Handshakes::new(100, 2);
        for a in ["2001:db8::1", "2001:db8::2"] {
            assert_eq!(h.decide(ip(a), true, 0, 100), Decision::Accept);
        }
        assert_eq!(
            h.decide(ip("2001:db8::ffff:1"), true, 0, 100),
            Decision::Refuse(Refusal::Address)
        );
        assert_eq!(
            h.decide(ip("2001:db8:0:1::1"), true, 0, 100),
            Decision::Accept
        );
        assert_eq!(
            h.decide(ip("::ffff:10.0.0.1"), true, 0, 100),
            Decision::Accept
        );
        assert_eq!(h.decide(ip("10.0.0.1"), true, 0, 100), Decision::Accept);
        assert_eq!(
            h.decide(ip("10.0.0.1"), true, 0, 100),
            Decision::Refuse(Refusal::Address)
        );
        h.done(ip("2001:db8::1"));
        assert_eq!(h.decide(ip("2001:db8::7"), true, 0, 100), Decision::Accept);
        // A done for an address that holds nothing changes nothing.
        h.done(ip("192.0.2.1"));
        assert_eq!(h.in_flight(), 5);
    }
}
