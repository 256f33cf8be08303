//! `keel query account ADDR --prove`: a light client. From a trust root (genesis's validator
//! set, a checkpoint's hash, or, unchecked, the node's word for the height's epoch) it walks the epoch
//! changes up to the epoch of the proven height, checks that the height is final under that
//! epoch's set, and that the account proof holds against the final header's state root. Every
//! step's verdict is kept; the first that fails ends the walk with an error naming it.
//! The procedure is docs/light-client.md; the checks are `keel_node::light`.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use keel_node::light::{self, verify_epoch_change, verify_finality, Header, ValidatorSet};
use keel_node::rpc::types::{AccountInfo, Height};
use keel_node::{verify_proof, Address, Hash};
use serde::Serialize;

use crate::client::{KeelApiClient, Rpc};

/// What the walk starts from.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The validators of a genesis file (and its chain id and epoch length).
    Genesis(std::path::PathBuf),
    /// The set of `epoch`, whose hash is known out of band.
    Checkpoint {
        /// The epoch.
        epoch: u64,
        /// Its set's hash.
        hash: Hash,
    },
    /// The node's own answer for the proven height's epoch, unchecked.
    Node,
}

impl Trust {
    /// `--trust EPOCH:0xHASH`.
    pub fn parse_checkpoint(s: &str) -> Result<Trust> {
        let (epoch, hash) = s
            .split_once(':')
            .ok_or_else(|| anyhow!("--trust {s:?}: expected EPOCH:0xHASH"))?;
        Ok(Trust::Checkpoint {
            epoch: epoch
                .parse()
                .with_context(|| format!("--trust {s:?}: epoch {epoch:?}"))?,
            hash: hash
                .parse()
                .with_context(|| format!("--trust {s:?}: hash {hash:?}"))?,
        })
    }
}

/// What `--prove` prints once every step checks out.
#[derive(Serialize)]
pub struct ProvedAccount {
    /// The account (null if it does not exist: its absence is what was proven).
    pub account: Option<AccountInfo>,
    /// The height proven at.
    pub height: u64,
    /// The final header's state root.
    pub state_root: Hash,
    /// The epoch of that height.
    pub epoch: u64,
    /// What the walk trusted.
    pub trusted: String,
    /// Each step's verdict, in order.
    pub steps: Vec<String>,
    /// True: every step held (otherwise the command fails).
    pub proof_verified: bool,
}

fn decode_header(bytes: &[u8]) -> Result<Header> {
    Header::decode(bytes).map_err(|e| anyhow!("header bytes do not decode: {e}"))
}

/// Runs the whole walk.
pub async fn prove_account(
    rpc: &Rpc,
    address: Address,
    height: Option<Height>,
    trust: &Trust,
) -> Result<ProvedAccount> {
    let mut steps = Vec::new();
    let status = rpc.call("chain_status", rpc.api().chain_status()).await?;
    let result = rpc
        .call("state_getProof", rpc.api().state_get_proof(address, height))
        .await?;
    let at = result.height;
    let target_epoch = result.epoch;
    let Some(finality) = result.finality.as_ref() else {
        bail!("height {at} is genesis: check it against your genesis file (--prove needs a height of 1 or more)");
    };

    // The trust root: an epoch, its set, the chain id, and (when known) the epoch length.
    let (mut epoch, mut set, chain_id, mut epoch_length, trusted): (
        u64,
        ValidatorSet,
        String,
        Option<u64>,
        String,
    ) = match trust {
        Trust::Genesis(path) => {
            let genesis = read_genesis(path)?;
            let set = light::genesis_set(&genesis)
                .map_err(|e| anyhow!("genesis {}: {e}", path.display()))?;
            if genesis.chain_id != status.chain_id {
                bail!(
                    "the node is on chain {:?}, the genesis file {} is of {:?}",
                    status.chain_id,
                    path.display(),
                    genesis.chain_id
                );
            }
            steps.push(format!(
                "trusted: epoch 0's {} validators from {} (set hash {})",
                set.len(),
                path.display(),
                set.hash()
            ));
            let trusted = format!("genesis file {}", path.display());
            (
                0,
                set,
                genesis.chain_id.clone(),
                Some(genesis.params.epoch_length),
                trusted,
            )
        }
        Trust::Checkpoint { epoch, hash } => {
            let set = if *epoch == 0 {
                node_set(rpc, 1).await?
            } else {
                let change = rpc
                    .call(
                        "chain_getEpochChange",
                        rpc.api().chain_get_epoch_change(*epoch),
                    )
                    .await?;
                light::set_from_members(&change.validators)
                    .map_err(|e| anyhow!("the set of epoch {epoch}: {e}"))?
            };
            if set.hash() != *hash {
                bail!(
                    "step failed: the node's set of epoch {epoch} has hash {}, the checkpoint says {hash}",
                    set.hash()
                );
            }
            steps.push(format!(
                "trusted: epoch {epoch}'s {} validators, matching the checkpoint hash {hash}",
                set.len()
            ));
            (
                *epoch,
                set,
                status.chain_id.clone(),
                None,
                format!("checkpoint {epoch}:{hash}"),
            )
        }
        Trust::Node => {
            // No trust root given: the node's word for the proven height's own epoch (no
            // walk, so it also works where a pruning node no longer has the epoch changes).
            let set = node_set(rpc, at).await?;
            steps.push(format!(
                "trusted WITHOUT CHECK: epoch {target_epoch}'s {} validators as the node reports \
                 them (give --genesis FILE or --trust EPOCH:HASH to check them)",
                set.len()
            ));
            (
                target_epoch,
                set,
                status.chain_id.clone(),
                None,
                format!("the node's epoch-{target_epoch} set (unchecked)"),
            )
        }
    };
    if target_epoch < epoch {
        bail!("height {at} is in epoch {target_epoch}, before the trusted epoch {epoch}");
    }

    // Walk the epoch changes.
    while epoch < target_epoch {
        let next = epoch + 1;
        let change = rpc
            .call(
                "chain_getEpochChange",
                rpc.api().chain_get_epoch_change(next),
            )
            .await?;
        let length = match epoch_length {
            Some(l) => l,
            None => {
                // Taken from the first change; a wrong one would fail the finality checks.
                let l = change.height / next.max(1);
                epoch_length = Some(l);
                l
            }
        };
        set = verify_epoch_change(&change, &chain_id, length, &set)
            .map_err(|e| anyhow!("step failed: epoch {next}: {e}"))?;
        steps.push(format!(
            "ok: epoch {next}: {} validators (set hash {}) follow from the state at height {}, final under epoch {epoch}'s set",
            set.len(),
            set.hash(),
            change.height
        ));
        epoch = next;
    }

    // The header is final under the epoch's set.
    let proven_set = set.clone();
    let final_header = verify_finality(finality, &chain_id, &|e| {
        if e == target_epoch {
            Ok(proven_set.clone())
        } else {
            Err(format!(
                "certificates of epoch {e} prove a header of epoch {target_epoch}"
            ))
        }
    })
    .map_err(|e| anyhow!("step failed: finality of height {at}: {e}"))?;
    let header = decode_header(&result.header.0)?;
    if header != final_header.header {
        bail!("step failed: the header served is not the one the finality proof proves");
    }
    if header.validators_hash != set.hash() {
        bail!(
            "step failed: header {at} names validator set {}, epoch {target_epoch}'s is {}",
            header.validators_hash,
            set.hash()
        );
    }
    steps.push(format!(
        "ok: height {at} is final: 2-chain {}/{} certified by epoch {target_epoch}'s set ({} headers)",
        final_header.two_chain.0, final_header.two_chain.1, final_header.headers
    ));

    // The account against the final header's state root.
    if header.state_root != result.state_root {
        bail!(
            "step failed: the proof is against root {}, header {at} has {}",
            result.state_root,
            header.state_root
        );
    }
    verify_proof(
        &header.state_root,
        &keel_node::account_key(&address),
        result.value.as_ref().map(|v| v.0.as_slice()),
        &result.proof,
    )
    .map_err(|e| anyhow!("step failed: the account proof against height {at}'s state root: {e}"))?;
    steps.push(format!(
        "ok: account {address} {} at height {at} (state root {})",
        if result.value.is_some() {
            "proven"
        } else {
            "proven absent"
        },
        header.state_root
    ));
    Ok(ProvedAccount {
        account: result.account,
        height: at,
        state_root: header.state_root,
        epoch: target_epoch,
        trusted,
        steps,
        proof_verified: true,
    })
}

/// The node's word for the set that signs the block at `height` (its epoch's set; height 1
/// for epoch 0's).
async fn node_set(rpc: &Rpc, height: u64) -> Result<ValidatorSet> {
    let validators = rpc
        .call(
            "state_getValidators",
            rpc.api().state_get_validators(Some(Height(height.max(1)))),
        )
        .await?;
    let members: Vec<light::SetMember> = validators
        .iter()
        .map(|v| light::SetMember {
            address: v.address,
            public_key: v.public_key.clone(),
            stake: v.stake,
        })
        .collect();
    light::set_from_members(&members)
        .map_err(|e| anyhow!("the validator set at height {height}: {e}"))
}

fn read_genesis(path: &Path) -> Result<keel_genesis::Genesis> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read genesis file {}", path.display()))?;
    keel_genesis::Genesis::from_json(&text)
        .map_err(|e| anyhow!("genesis file {}: {e}", path.display()))
}
