//! The peer manager: scores from behaviour, bans, connection limits with reserved slots,
//! persistent peers redialled with back-off, seeds rotated while below the target. Pure
//! bookkeeping driven by the service with the current time, so it is tested without sockets.

use std::collections::{HashMap, HashSet};

use libp2p::{Multiaddr, PeerId};

use crate::Report;

/// Score change of a useful message (capped at [`MAX_SCORE`]).
pub const USEFUL: i32 = 1;
/// Score change of a message that failed to decode or verify.
pub const INVALID: i32 = -10;
/// Score change of an oversized or abusive message.
pub const MALICIOUS: i32 = -50;
/// Score change of a slow or failed ping.
pub const SLOW: i32 = -2;
/// A ping answered slower than this lowers the peer's score.
pub const SLOW_PING_MS: u64 = 1_000;
/// Highest score.
pub const MAX_SCORE: i32 = 100;
/// A peer at or below this score is banned.
pub const BAN_THRESHOLD: i32 = -100;
/// How long a ban lasts.
pub const BAN_MS: u64 = 10 * 60 * 1000;
/// Score a peer comes back with after a ban: a repeat offender is banned again quickly.
pub const AFTER_BAN: i32 = -50;
/// Longest wait between two dials of a persistent peer.
pub const MAX_REDIAL_MS: u64 = 60_000;

/// What the manager remembers of a peer across restarts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRecord {
    /// The peer.
    pub peer: PeerId,
    /// Its score.
    pub score: i32,
    /// Unix milliseconds its ban ends (0: not banned).
    pub banned_until_ms: u64,
}

/// Connection limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most connected peers, reserved ones excepted.
    pub max_peers: usize,
    /// Peers to keep; below it seeds are dialled.
    pub target_peers: usize,
    /// Inbound connections accepted per second.
    pub inbound_per_sec: u32,
}

/// What the service should do about a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Disconnect it (and refuse it until its ban ends).
    Ban,
}

/// Scores, bans and dial plans.
#[derive(Debug)]
pub struct PeerManager {
    limits: Limits,
    scores: HashMap<PeerId, i32>,
    banned_until: HashMap<PeerId, u64>,
    persistent: Vec<(PeerId, Multiaddr)>,
    /// Reserved slots: persistent peers and the current validators' peers.
    reserved: HashSet<PeerId>,
    /// Next dial time and attempts of disconnected persistent peers.
    redial: HashMap<PeerId, (u64, u32)>,
    seeds: Vec<Multiaddr>,
    next_seed: usize,
    inbound_window: (u64, u32),
}

impl PeerManager {
    /// A manager with these limits, persistent peers (each with its `/p2p/` id) and seeds.
    pub fn new(
        limits: Limits,
        persistent: Vec<(PeerId, Multiaddr)>,
        seeds: Vec<Multiaddr>,
    ) -> Self {
        let reserved = persistent.iter().map(|(p, _)| *p).collect();
        let redial = persistent.iter().map(|(p, _)| (*p, (0, 0))).collect();
        PeerManager {
            limits,
            scores: HashMap::new(),
            banned_until: HashMap::new(),
            persistent,
            reserved,
            redial,
            seeds,
            next_seed: 0,
            inbound_window: (0, 0),
        }
    }

    /// Restores scores and bans saved by [`PeerManager::records`].
    pub fn restore(&mut self, records: Vec<PeerRecord>) {
        for r in records {
            self.scores.insert(r.peer, r.score);
            if r.banned_until_ms > 0 {
                self.banned_until.insert(r.peer, r.banned_until_ms);
            }
        }
    }

    /// Scores and bans worth keeping (non-zero scores, active bans).
    pub fn records(&self, now_ms: u64) -> Vec<PeerRecord> {
        let mut peers: HashSet<PeerId> = self.scores.keys().copied().collect();
        peers.extend(self.banned_until.keys().copied());
        let mut out: Vec<PeerRecord> = peers
            .into_iter()
            .map(|peer| PeerRecord {
                peer,
                score: self.score(&peer),
                banned_until_ms: self
                    .banned_until
                    .get(&peer)
                    .copied()
                    .filter(|t| *t > now_ms)
                    .unwrap_or(0),
            })
            .filter(|r| r.score != 0 || r.banned_until_ms != 0)
            .collect();
        out.sort_by_key(|r| r.peer.to_bytes());
        out
    }

    /// A peer's score (0 if unknown).
    pub fn score(&self, peer: &PeerId) -> i32 {
        self.scores.get(peer).copied().unwrap_or(0)
    }

    /// Whether `peer` is banned at `now_ms`. An expired ban is lifted, with a low score.
    pub fn is_banned(&mut self, peer: &PeerId, now_ms: u64) -> bool {
        match self.banned_until.get(peer) {
            Some(until) if *until > now_ms => true,
            Some(_) => {
                self.banned_until.remove(peer);
                self.scores.insert(*peer, AFTER_BAN);
                false
            }
            None => false,
        }
    }

    /// Records behaviour; a peer that falls to the ban threshold is banned.
    pub fn report(&mut self, peer: &PeerId, report: Report, now_ms: u64) -> Verdict {
        let delta = match report {
            Report::Useful => USEFUL,
            Report::Invalid => INVALID,
            Report::Malicious => MALICIOUS,
            Report::Slow => SLOW,
        };
        let score = self.scores.entry(*peer).or_insert(0);
        *score = score.saturating_add(delta).min(MAX_SCORE);
        if *score <= BAN_THRESHOLD {
            self.banned_until
                .insert(*peer, now_ms.saturating_add(BAN_MS));
            Verdict::Ban
        } else {
            Verdict::Keep
        }
    }

    /// Marks the current validators' peers as reserved (kept beyond `max_peers`).
    pub fn set_validator_peers(&mut self, peers: impl IntoIterator<Item = PeerId>) {
        self.reserved = self.persistent.iter().map(|(p, _)| *p).collect();
        self.reserved.extend(peers);
    }

    /// Whether a new connection with `peer` may stay, `connected` peers being connected
    /// already (not counting it). Inbound connections also count against the per-second
    /// budget.
    pub fn admit(&mut self, peer: &PeerId, inbound: bool, connected: usize, now_ms: u64) -> bool {
        if self.is_banned(peer, now_ms) {
            return false;
        }
        if inbound {
            let second = now_ms / 1000;
            if self.inbound_window.0 != second {
                self.inbound_window = (second, 0);
            }
            if self.inbound_window.1 >= self.limits.inbound_per_sec {
                return false;
            }
            self.inbound_window.1 += 1;
        }
        self.reserved.contains(peer) || connected < self.limits.max_peers
    }

    /// A peer connected: a persistent one needs no redial.
    pub fn connected(&mut self, peer: &PeerId) {
        self.redial.remove(peer);
    }

    /// A peer disconnected (or a dial failed): persistent peers are redialled with back-off
    /// (1 s, 2 s, 4 s, ... up to [`MAX_REDIAL_MS`]).
    pub fn disconnected(&mut self, peer: &PeerId, now_ms: u64) {
        if !self.persistent.iter().any(|(p, _)| p == peer) {
            return;
        }
        let attempts = self.redial.get(peer).map_or(0, |r| r.1);
        let wait = (1000u64 << attempts.min(6)).min(MAX_REDIAL_MS);
        self.redial.insert(
            *peer,
            (now_ms.saturating_add(wait), attempts.saturating_add(1)),
        );
    }

    /// Addresses to dial now: persistent peers whose redial time came (rescheduled with
    /// back-off in case the dial fails silently), and, below the target, the next seed.
    pub fn due_dials(&mut self, now_ms: u64, connected: &HashSet<PeerId>) -> Vec<Multiaddr> {
        let mut out = Vec::new();
        for (peer, addr) in &self.persistent {
            if connected.contains(peer) || self.banned_until.get(peer).is_some_and(|t| *t > now_ms)
            {
                continue;
            }
            let Some((at, attempts)) = self.redial.get(peer).copied() else {
                continue;
            };
            if at <= now_ms {
                out.push(addr.clone());
                let wait = (1000u64 << attempts.min(6)).min(MAX_REDIAL_MS);
                self.redial.insert(
                    *peer,
                    (now_ms.saturating_add(wait), attempts.saturating_add(1)),
                );
            }
        }
        if connected.len() < self.limits.target_peers && !self.seeds.is_empty() {
            let seed = self.seeds[self.next_seed % self.seeds.len()].clone();
            self.next_seed = self.next_seed.wrapping_add(1);
            out.push(seed);
        }
        out
    }

    /// Over the target, the connected peer to drop: the lowest-scored one not reserved.
    pub fn surplus(&self, connected: &HashSet<PeerId>) -> Option<PeerId> {
        if connected.len() <= self.limits.target_peers.max(1) {
            return None;
        }
        connected
            .iter()
            .filter(|p| !self.reserved.contains(*p))
            .min_by_key(|p| (self.score(p), p.to_bytes()))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_peers: 3,
            target_peers: 2,
            inbound_per_sec: 2,
        }
    }

    fn addr(port: u16, peer: &PeerId) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}")
            .parse()
            .unwrap()
    }

    #[test]
    fn misbehaving_peers_are_banned_for_a_while_and_remembered() {
        let mut pm = PeerManager::new(limits(), vec![], vec![]);
        let bad = PeerId::random();
        assert_eq!(pm.report(&bad, Report::Invalid, 0), Verdict::Keep);
        assert_eq!(pm.score(&bad), INVALID);
        assert_eq!(pm.report(&bad, Report::Malicious, 0), Verdict::Keep);
        assert_eq!(pm.report(&bad, Report::Malicious, 1000), Verdict::Ban);
        assert!(pm.is_banned(&bad, 2000));
        assert!(!pm.admit(&bad, false, 0, 2000));

        // Saved and restored: a restart does not forget the ban.
        let saved = pm.records(2000);
        assert_eq!(saved.len(), 1);
        let mut again = PeerManager::new(limits(), vec![], vec![]);
        again.restore(saved);
        assert!(again.is_banned(&bad, 2000));
        // The ban ends; the peer comes back with a low score.
        assert!(!again.is_banned(&bad, 1000 + BAN_MS + 1));
        assert_eq!(again.score(&bad), AFTER_BAN);

        let slow = PeerId::random();
        pm.report(&slow, Report::Slow, 0);
        assert_eq!(pm.score(&slow), SLOW, "latency lowers the score");
        let good = PeerId::random();
        for _ in 0..500 {
            pm.report(&good, Report::Useful, 0);
        }
        assert_eq!(pm.score(&good), MAX_SCORE);
    }

    #[test]
    fn limits_leave_room_for_reserved_peers_and_throttle_inbound() {
        let persistent = PeerId::random();
        let mut pm = PeerManager::new(limits(), vec![(persistent, addr(1, &persistent))], vec![]);
        let other = PeerId::random();
        assert!(pm.admit(&other, false, 2, 0));
        assert!(!pm.admit(&other, false, 3, 0), "max_peers reached");
        assert!(
            pm.admit(&persistent, false, 3, 0),
            "persistent peers have reserved slots"
        );
        let validator = PeerId::random();
        assert!(!pm.admit(&validator, false, 3, 0));
        pm.set_validator_peers([validator]);
        assert!(pm.admit(&validator, false, 3, 0));

        // Two inbound per second.
        assert!(pm.admit(&PeerId::random(), true, 0, 5_000));
        assert!(pm.admit(&PeerId::random(), true, 0, 5_100));
        assert!(!pm.admit(&PeerId::random(), true, 0, 5_200));
        assert!(pm.admit(&PeerId::random(), true, 0, 6_000));
    }

    #[test]
    fn persistent_peers_are_redialled_with_back_off_and_seeds_rotate() {
        let p = PeerId::random();
        let seeds: Vec<Multiaddr> = vec![
            "/ip4/10.0.0.1/tcp/1".parse().unwrap(),
            "/ip4/10.0.0.2/tcp/1".parse().unwrap(),
        ];
        let mut pm = PeerManager::new(limits(), vec![(p, addr(7, &p))], seeds.clone());
        let none = HashSet::new();
        let first = pm.due_dials(0, &none);
        assert_eq!(first, vec![addr(7, &p), seeds[0].clone()]);
        // Not again until the back-off passes.
        assert_eq!(pm.due_dials(500, &none), vec![seeds[1].clone()]);
        assert!(pm.due_dials(1000, &none).contains(&addr(7, &p)));
        // Connected: no more dials of it; at the target, no seeds.
        pm.connected(&p);
        let full: HashSet<PeerId> = [p, PeerId::random()].into_iter().collect();
        assert!(pm.due_dials(100_000, &full).is_empty());
        // Dropped: redialled after a second, then 2 s, 4 s, ...
        pm.disconnected(&p, 200_000);
        assert!(pm.due_dials(200_500, &full).is_empty());
        let connected_other: HashSet<PeerId> = [PeerId::random(), PeerId::random()].into();
        assert_eq!(pm.due_dials(201_000, &connected_other), vec![addr(7, &p)]);
        assert!(pm.due_dials(202_500, &connected_other).is_empty());
        assert_eq!(pm.due_dials(203_000, &connected_other), vec![addr(7, &p)]);
    }

    #[test]
    fn the_lowest_scored_unreserved_peer_goes_first_over_the_target() {
        let keep = PeerId::random();
        let mut pm = PeerManager::new(limits(), vec![(keep, addr(1, &keep))], vec![]);
        let (a, b) = (PeerId::random(), PeerId::random());
        pm.report(&a, Report::Invalid, 0);
        pm.report(&keep, Report::Malicious, 0);
        let connected: HashSet<PeerId> = [keep, a, b].into();
        assert_eq!(pm.surplus(&connected), Some(a));
        let two: HashSet<PeerId> = [keep, a].into();
        assert_eq!(pm.surplus(&two), None);
    }
}
