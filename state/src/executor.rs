//! The sequential block executor: the reference implementation of the transaction rules.
//!
//! A later parallel executor must produce byte-identical receipts, state roots and batches,
//! so this one is kept plain: the block's evidence is applied, then transactions run one after
//! another against a per-block account cache, and every changed account (and the validator
//! registry, if a bond added to it) goes into the tree in one update at the end.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use keel_storage::{KvStore, WriteBatch};
use keel_types::{verify_batch, Address, Hash, PublicKey, Receipt, Signature, Transaction, TxKind};
use rayon::prelude::*;

use crate::tree::{Proof, StateTree};
use crate::{Account, Error, Result, StakeEntry, Unbonding, ValidatorRegistry};

/// The tree key of an account: blake3 of the 20 address bytes.
pub fn account_key(addr: &Address) -> Hash {
    Hash::digest(addr.as_bytes())
}

/// Chain parameters the executor needs.
#[derive(Clone, Debug)]
pub struct ExecParams {
    /// Transactions for any other chain are rejected.
    pub chain_id: String,
    /// Smallest fee a transaction may pay.
    pub min_fee: u64,
    /// Blocks between an unbond and the return of its stake to the balance.
    pub unbonding_period: u64,
    /// Share of an equivocator's stake (and pending unbonding) slashed, in parts per million.
    /// Values above 1,000,000 act as 1,000,000.
    pub slash_fraction_ppm: u32,
}

/// The block being executed.
#[derive(Clone, Debug, Default)]
pub struct BlockEnv {
    /// Its height: the state version it produces.
    pub height: u64,
    /// Who proposed it: receives the fees.
    pub proposer: Address,
    /// Equivocation evidence the block carries, applied in order before its transactions.
    /// The executor checks each piece again and ignores (deterministically) any that is
    /// invalid or whose offender is already jailed.
    pub evidence: Vec<keel_types::Evidence>,
}

/// What executing a block produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockOutcome {
    /// One receipt per transaction, in block order.
    pub receipts: Vec<Receipt>,
    /// State root of version `height`.
    pub state_root: Hash,
    /// Every account written to the tree, by ascending address.
    pub changed: Vec<(Address, Account)>,
    /// Validators slashed and jailed by the block's evidence, in evidence order, with the
    /// amount burned (stake and unbonding together; may be 0).
    pub slashed: Vec<(Address, u64)>,
}

/// Transactions per batch-verification chunk. Fixed, so the chunking of a block (and with it
/// the verdict on every transaction) is the same on every node and every thread count.
pub const SIGNATURE_CHUNK: usize = 64;

/// Verifies the signatures of `txs`: ed25519 batch verification over fixed chunks of
/// [`SIGNATURE_CHUNK`] transactions in parallel (rayon), falling back to verifying one by one
/// inside a chunk whose batch fails. `result[i]` says whether transaction `i` is valid.
pub fn verify_signatures(txs: &[Transaction]) -> Vec<bool> {
    let chunks: Vec<Vec<bool>> = txs.par_chunks(SIGNATURE_CHUNK).map(verify_chunk).collect();
    chunks.concat()
}

fn verify_chunk(chunk: &[Transaction]) -> Vec<bool> {
    let msgs: Vec<Hash> = chunk.iter().map(|t| t.signing_hash).collect();
    let sigs: Vec<Signature> = chunk.iter().map(|t| t.signature).collect();
    let keys: Vec<PublicKey> = chunk.iter().map(|t| t.public_key).collect();
    if verify_batch(&msgs, &sigs, &keys).is_ok() {
        return vec![true; chunk.len()];
    }
    chunk.iter().map(|t| t.verify_signature().is_ok()).collect()
}

/// Account state and block execution over a [`StateTree`].
pub struct State {
    tree: StateTree,
    params: ExecParams,
}

impl State {
    /// State over `store` with the chain's parameters.
    pub fn new(store: Arc<dyn KvStore>, params: ExecParams) -> State {
        State {
            tree: StateTree::new(store),
            params,
        }
    }

    /// State with a node cache of `nodes` entries: for short-lived views (one execution over
    /// an overlay of non-final blocks), where the default cache would cost megabytes of
    /// allocation and never warm up.
    pub fn with_node_cache(store: Arc<dyn KvStore>, params: ExecParams, nodes: usize) -> State {
        State {
            tree: StateTree::with_cache_capacity(store, nodes),
            params,
        }
    }

    /// The chain parameters.
    pub fn params(&self) -> &ExecParams {
        &self.params
    }

    /// The underlying tree.
    pub fn tree(&self) -> &StateTree {
        &self.tree
    }

    /// The account of `addr` as stored at `version` (`None` if it never existed). Matured
    /// unbonding entries are credited lazily, so the stored balance may not include them yet:
    /// see [`Account::release_matured`].
    pub fn account(&self, addr: &Address, version: u64) -> Result<Option<Account>> {
        self.tree
            .get(version, &account_key(addr))?
            .map(|b| Account::decode(&b))
            .transpose()
    }

    /// The account of `addr` at `version`, a proof of it (or of its absence) and the root the
    /// proof is against. The proven value is [`Account::encode`] of the account.
    pub fn account_with_proof(
        &self,
        addr: &Address,
        version: u64,
    ) -> Result<(Option<Account>, Proof, Hash)> {
        let root = self.tree.root(version)?;
        let (value, proof) = self.tree.get_with_proof(version, &account_key(addr))?;
        let account = value.map(|b| Account::decode(&b)).transpose()?;
        Ok((account, proof, root))
    }

    /// The state root of `version`.
    pub fn root(&self, version: u64) -> Result<Hash> {
        self.tree.root(version)
    }

    /// The validator registry at `version` (empty if none was ever written). Its bytes are
    /// provable like an account's: `tree().get_with_proof(version, &ValidatorRegistry::key())`.
    pub fn validator_registry(&self, version: u64) -> Result<ValidatorRegistry> {
        match self.tree.get(version, &ValidatorRegistry::key())? {
            Some(bytes) => ValidatorRegistry::decode(&bytes),
            None => Ok(ValidatorRegistry::default()),
        }
    }

    /// Registered, non-jailed accounts with stake > 0 at `version`, sorted by address: the
    /// candidates for a validator set, a function of the state at `version` alone.
    pub fn stakes(&self, version: u64) -> Result<Vec<StakeEntry>> {
        let registry = self.validator_registry(version)?;
        let mut out = Vec::new();
        for (address, public_key) in registry.iter() {
            let Some(account) = self.account(address, version)? else {
                continue;
            };
            if account.jailed || account.stake == 0 {
                continue;
            }
            out.push(StakeEntry {
                address: *address,
                public_key: *public_key,
                stake: account.stake,
            });
        }
        Ok(out)
    }

    /// Stages version 0 (genesis) into `batch` and returns its root: exactly `accounts`, and
    /// the registry of the genesis `validators`' keys (their stake is already on their
    /// accounts; no registry entry when there are none).
    pub fn init_genesis(
        &self,
        accounts: &[(Address, Account)],
        validators: &[PublicKey],
        batch: &mut WriteBatch,
    ) -> Result<Hash> {
        let mut seen = std::collections::HashSet::with_capacity(accounts.len());
        let mut updates = Vec::with_capacity(accounts.len().saturating_add(1));
        for (addr, account) in accounts {
            if !seen.insert(*addr) {
                return Err(Error::DuplicateGenesisAccount(*addr));
            }
            updates.push((account_key(addr), Some(account.encode())));
        }
        let mut registry = ValidatorRegistry::default();
        for key in validators {
            if !registry.insert(*key) {
                return Err(Error::DuplicateGenesisValidator(key.address()));
            }
        }
        if !registry.is_empty() {
            updates.push((ValidatorRegistry::key(), Some(registry.encode())));
        }
        self.tree.apply(None, 0, &updates, batch)
    }

    /// Applies `env.evidence`, then executes `txs`, on top of version `env.height - 1` and
    /// stages version `env.height` into `batch` (one tree update for the whole block).
    /// Deterministic: the outcome and the staged bytes depend only on the parent state, `env`
    /// and `txs`.
    pub fn execute_block(
        &self,
        env: &BlockEnv,
        txs: &[Transaction],
        batch: &mut WriteBatch,
    ) -> Result<BlockOutcome> {
        let base = env.height.checked_sub(1).ok_or(Error::GenesisHeight)?;
        // Fail early (before any work) if the parent state is not there.
        self.tree.root(base)?;
        let valid = verify_signatures(txs);
        let mut block = BlockRun {
            state: self,
            env,
            base,
            accounts: HashMap::new(),
            registry: None,
            bonded: BTreeMap::new(),
            slashed: Vec::new(),
        };
        block.apply_evidence()?;
        let mut receipts = Vec::with_capacity(txs.len());
        for (i, (tx, sig_ok)) in txs.iter().zip(valid).enumerate() {
            let index = u32::try_from(i).map_err(|_| Error::TooManyTransactions(txs.len()))?;
            let (success, error, fee) = block.execute_tx(tx, sig_ok)?;
            receipts.push(Receipt {
                tx_hash: tx.hash,
                height: env.height,
                index,
                success,
                error,
                fee,
            });
        }
        let registry = block.registry_update()?;
        let slashed = std::mem::take(&mut block.slashed);
        let changed = block.changed();
        let mut updates: Vec<(Hash, Option<Vec<u8>>)> = changed
            .iter()
            .map(|(a, acc)| (account_key(a), Some(acc.encode())))
            .collect();
        if let Some(bytes) = registry {
            updates.push((ValidatorRegistry::key(), Some(bytes)));
        }
        let state_root = self.tree.apply(Some(base), env.height, &updates, batch)?;
        tracing::debug!(
            height = env.height,
            txs = txs.len(),
            changed = changed.len(),
            slashed = slashed.len(),
            root = %state_root,
            "executed block"
        );
        Ok(BlockOutcome {
            receipts,
            state_root,
            changed,
            slashed,
        })
    }
}

/// An account as loaded in this block.
struct Slot {
    /// What the tree holds at the parent version.
    stored: Option<Account>,
    /// The account now, matured unbonding credited.
    current: Account,
    /// Whether evidence or a transaction that was not rejected wrote it.
    dirty: bool,
}

/// One block's execution: the account cache and the rules.
struct BlockRun<'s> {
    state: &'s State,
    env: &'s BlockEnv,
    base: u64,
    accounts: HashMap<Address, Slot>,
    /// The registry at `base`, loaded on first use.
    registry: Option<ValidatorRegistry>,
    /// Keys of the senders of this block's successful positive bonds, registered (those not
    /// yet registered) in one write at the end.
    bonded: BTreeMap<Address, PublicKey>,
    /// Offenders slashed so far, with the amounts burned.
    slashed: Vec<(Address, u64)>,
}

/// Receipt essentials: success, error, fee charged.
type TxResult = (bool, Option<String>, u64);

fn rejected(reason: String) -> Result<TxResult> {
    Ok((false, Some(reason), 0))
}

/// Accounts changed by one phase of a transaction, committed to the block only if the whole
/// phase succeeds.
#[derive(Default)]
struct Overlay {
    accounts: BTreeMap<Address, Account>,
    /// A bonder's key, to register if the phase commits.
    register: Option<PublicKey>,
}

impl BlockRun<'_> {
    /// The account of `addr` as of now in this block. On first load, matured unbonding entries
    /// are credited (in the cache only; they reach the tree with the account's next write).
    fn load(&mut self, addr: &Address) -> Result<&mut Slot> {
        use std::collections::hash_map::Entry;
        match self.accounts.entry(*addr) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let stored = self.state.account(addr, self.base)?;
                let mut current = stored.clone().unwrap_or_default();
                current.release_matured(self.env.height);
                Ok(e.insert(Slot {
                    stored,
                    current,
                    dirty: false,
                }))
            }
        }
    }

    fn get(&mut self, overlay: &Overlay, addr: &Address) -> Result<Account> {
        match overlay.accounts.get(addr) {
            Some(a) => Ok(a.clone()),
            None => Ok(self.load(addr)?.current.clone()),
        }
    }

    fn commit(&mut self, overlay: Overlay) -> Result<()> {
        if let Some(key) = overlay.register {
            self.bonded.entry(key.address()).or_insert(key);
        }
        for (addr, account) in overlay.accounts {
            let slot = self.load(&addr)?;
            slot.current = account;
            slot.dirty = true;
        }
        Ok(())
    }

    /// The registry at the parent version (plus, after [`BlockRun::registry_update`], this
    /// block's registrations).
    fn registry(&mut self) -> Result<&mut ValidatorRegistry> {
        match &mut self.registry {
            Some(r) => Ok(r),
            slot => Ok(slot.insert(self.state.validator_registry(self.base)?)),
        }
    }

    /// Applies the block's evidence in order: each piece that verifies against the registry
    /// (see [`ValidatorRegistry::verify_evidence`]) and whose offender is not jailed yet
    /// slashes the offender ([`Account::slash`], the amount is burned) and jails it. Anything
    /// else, a repeat for the same offender included, is skipped.
    fn apply_evidence(&mut self) -> Result<()> {
        let (state, env) = (self.state, self.env);
        for evidence in &env.evidence {
            if self
                .registry()?
                .verify_evidence(evidence, &state.params.chain_id)
                .is_none()
            {
                continue;
            }
            let offender = evidence.offender();
            let slot = self.load(&offender)?;
            if slot.current.jailed {
                continue;
            }
            let amount = slot.current.slash(state.params.slash_fraction_ppm);
            slot.current.jailed = true;
            slot.dirty = true;
            tracing::info!(
                height = env.height,
                %offender,
                amount,
                "slashed and jailed an equivocating validator"
            );
            self.slashed.push((offender, amount));
        }
        Ok(())
    }

    /// The new registry bytes if this block's bonds registered anyone new, else `None`.
    fn registry_update(&mut self) -> Result<Option<Vec<u8>>> {
        if self.bonded.is_empty() {
            return Ok(None);
        }
        let bonded = std::mem::take(&mut self.bonded);
        let registry = self.registry()?;
        let mut added = false;
        for key in bonded.into_values() {
            added |= registry.insert(key);
        }
        Ok(added.then(|| registry.encode()))
    }

    /// Runs one transaction. `Err` only for storage failures; rule violations are receipts.
    fn execute_tx(&mut self, tx: &Transaction, sig_ok: bool) -> Result<TxResult> {
        let params = &self.state.params;
        if tx.chain_id != params.chain_id {
            return rejected("wrong chain id".into());
        }
        if !sig_ok {
            return rejected("invalid signature".into());
        }
        let min_fee = params.min_fee;
        let mut sender = self.load(&tx.sender)?.current.clone();
        if tx.nonce != sender.nonce {
            return rejected(format!(
                "bad nonce: expected {}, got {}",
                sender.nonce, tx.nonce
            ));
        }
        if tx.fee < min_fee {
            return rejected(format!("fee {} below minimum {}", tx.fee, min_fee));
        }

        // Fee phase: all or nothing.
        let Some(balance) = sender.balance.checked_sub(tx.fee) else {
            return rejected(format!(
                "cannot pay fee {}: balance {}",
                tx.fee, sender.balance
            ));
        };
        let Some(nonce) = sender.nonce.checked_add(1) else {
            return rejected("nonce overflow".into());
        };
        sender.balance = balance;
        sender.nonce = nonce;
        let mut overlay = Overlay::default();
        overlay.accounts.insert(tx.sender, sender);
        let mut proposer = self.get(&overlay, &self.env.proposer)?;
        let Some(balance) = proposer.balance.checked_add(tx.fee) else {
            return rejected("fee would overflow the proposer's balance".into());
        };
        proposer.balance = balance;
        overlay.accounts.insert(self.env.proposer, proposer);
        self.commit(overlay)?;

        // Action phase: on failure the fee stays paid and the nonce used.
        match self.action(tx)? {
            Ok(overlay) => {
                self.commit(overlay)?;
                Ok((true, None, tx.fee))
            }
            Err(reason) => Ok((false, Some(reason), tx.fee)),
        }
    }

    /// The effect of a transaction's action, or why it fails.
    fn action(&mut self, tx: &Transaction) -> Result<std::result::Result<Overlay, String>> {
        let mut overlay = Overlay::default();
        let mut sender = self.get(&overlay, &tx.sender)?;
        match tx.kind {
            TxKind::Transfer { to, amount } => {
                let Some(balance) = sender.balance.checked_sub(amount) else {
                    return Ok(Err("insufficient funds".into()));
                };
                sender.balance = balance;
                overlay.accounts.insert(tx.sender, sender);
                // Reads the sender from the overlay when sending to oneself.
                let mut recipient = self.get(&overlay, &to)?;
                let Some(balance) = recipient.balance.checked_add(amount) else {
                    return Ok(Err("recipient balance would overflow".into()));
                };
                recipient.balance = balance;
                overlay.accounts.insert(to, recipient);
            }
            TxKind::Bond { amount } => {
                if sender.jailed {
                    return Ok(Err("validator is jailed".into()));
                }
                let Some(balance) = sender.balance.checked_sub(amount) else {
                    return Ok(Err("insufficient funds".into()));
                };
                let Some(stake) = sender.stake.checked_add(amount) else {
                    return Ok(Err("stake would overflow".into()));
                };
                sender.balance = balance;
                sender.stake = stake;
                overlay.accounts.insert(tx.sender, sender);
                if amount > 0 {
                    overlay.register = Some(tx.public_key);
                }
            }
            TxKind::Unbond { amount } => {
                let Some(stake) = sender.stake.checked_sub(amount) else {
                    return Ok(Err("insufficient stake".into()));
                };
                let Some(release_height) = self
                    .env
                    .height
                    .checked_add(self.state.params.unbonding_period)
                else {
                    return Ok(Err("release height would overflow".into()));
                };
                sender.stake = stake;
                if amount > 0 {
                    sender.unbonding.push(Unbonding {
                        amount,
                        release_height,
                    });
                }
                overlay.accounts.insert(tx.sender, sender);
            }
        }
        Ok(Ok(overlay))
    }

    /// Accounts to write, by ascending address: written by evidence or an accepted transaction
    /// and now different from what the tree holds. An account that never existed and is still all
    /// zero (say, the recipient of a zero transfer) stays absent.
    fn changed(self) -> Vec<(Address, Account)> {
        let mut out: Vec<(Address, Account)> = self
            .accounts
            .into_iter()
            .filter(|(_, s)| s.dirty)
            .filter(|(_, s)| match &s.stored {
                Some(stored) => *stored != s.current,
                None => s.current != Account::default(),
            })
            .map(|(a, s)| (a, s.current))
            .collect();
        out.sort_by_key(|a| a.0);
        out
    }
}

#[cfg(test)]
mod tests;
