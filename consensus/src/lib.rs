//! keel consensus as a pure state machine.
//!
//! The node feeds [`Input`]s into [`Engine::handle`] together with the current time, and
//! carries out the [`Effect`]s it returns, in order: schedule a timer, build a block, persist
//! safety data, commit a certified block, mark a block final. The crate has no tokio, no
//! storage, no networking, no wall clock and no global RNG, so a simulation can drive it with
//! virtual time and a seeded network.
//!
//! Invariants:
//! - The engine never signs two votes in one round, and its safety data
//!   ([`SafetyData`]) is handed to the node in a [`Effect::PersistSafety`] that precedes any
//!   effect carrying a vote or certificate built from it. The node must make it durable
//!   before carrying out the next effect.
//! - A block is final once it and its direct child (next round) are certified.
//!
//! Today the engine runs a one-validator chain: with a single validator holding all stake its
//! own vote is a quorum, so each block it builds is certified at once, and the parent becomes
//! final. The multi-validator 2-chain HotStuff protocol (proposals, votes to the next leader,
//! timeout certificates) replaces the body of [`Engine`] behind these same `Input`/`Effect`
//! types; [`Engine::new`] refuses validator sets it cannot drive yet.

mod engine;
mod error;
mod validators;

pub use engine::{BuildRequest, Config, Effect, Engine, Input, SafetyData, TimerKind, Tip};
pub use error::{Error, Result};
pub use validators::{Validator, ValidatorSet};
