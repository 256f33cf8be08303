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
//! - Only votes whose signatures were checked count as a validator's vote in a round, so a
//!   forged vote can neither shadow a real one nor make an honest validator an equivocator.
//!
//! The protocol is 2-chain HotStuff (Jolteon / DiemBFT v4 family); `docs/consensus.md`
//! describes it, its safety argument and its message flow. The validator set is fixed within
//! each epoch; the node computes the next epoch's set from final state and hands it in
//! ([`Effect::NeedValidatorSet`], [`Input::NewEpoch`]), keeping recent sets in a
//! [`ValidatorSetCache`].

mod cache;
mod engine;
mod error;
mod validators;

pub use cache::{CacheStats, ValidatorSetCache};
pub use engine::{
    check_qc, epoch_end_height, epoch_of_next_block, BuildRequest, Config, Effect, Engine, Input,
    Origin, SafetyData, TimerKind, Tip, HISTORY_HEADERS,
};
pub use error::{Error, Result};
pub use validators::{Validator, ValidatorSet};
