//! The sequential block executor: the reference implementation of the transaction rules.
//!
//! A later parallel executor must produce byte-identical receipts, state roots and batches,
//! so this one is kept plain: the block's evidence is applied, then transactions run one after
//! another against a per-block account cache, and every changed account (and the validator
//! registry, if a bond added to it) goes into the tree in one update at the end.

mod parallel;

use std::collections::BTreeMap;
use std::sync::Arc;

use keel_storage::{KvStore, WriteBatch};
use keel_types::{Address, Hash, PublicKey, Receipt, Transaction, TxKind};

use rayon::prelude::*;

use crate::signatures::{verify_transactions, SigCache};
use crate::tree::{FreshNodes, NodeCache, Proof, ReadNodes, StateTree};
use crate::{Account, Error, FastMap, Result, StakeEntry, Unbonding, ValidatorRegistry};

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

/// Account state and block execution over a [`StateTree`].
pub struct State {
    tree: StateTree,
    params: ExecParams,
    /// Transactions whose signatures are known valid (filled at mempool admission).
    sig_cache: Option<Arc<SigCache>>,
}

impl State {
    /// State over `store` with the chain's parameters.
    pub fn new(store: Arc<dyn KvStore>, params: ExecParams) -> State {
        State {
            tree: StateTree::new(store),
            params,
            sig_cache: None,
        }
    }

    /// State over `store` (an overlay of pending blocks on the database) sharing `cache`,
    /// the database state's node cache, for nodes of versions up to `final_height`
    /// (committed, so immutable); see [`StateTree::with_shared_cache`].
    pub fn with_shared_node_cache(
        store: Arc<dyn KvStore>,
        params: ExecParams,
        cache: Arc<NodeCache>,
        final_height: u64,
    ) -> State {
        State {
            tree: StateTree::with_shared_cache(store, cache, final_height),
            params,
            sig_cache: None,
        }
    }

    /// Lets block execution skip verifying the signatures of transactions in `cache` (and add
    /// those it verifies).
    pub fn with_signature_cache(mut self, cache: Arc<SigCache>) -> State {
        self.sig_cache = Some(cache);
        self
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
    /// and `txs`. Runs the parallel executor ([`State::execute`]) then [`State::stage`].
    pub fn execute_block(
        &self,
        env: &BlockEnv,
        txs: &[Transaction],
        batch: &mut WriteBatch,
    ) -> Result<BlockOutcome> {
        let execution = self.execute(env, txs)?;
        self.stage(execution, batch)
    }

    /// Verifies signatures (skipping those in the signature cache) and executes the block's
    /// evidence and transactions on the rayon pool: accounts are loaded in parallel and
    /// transactions are run in independent groups (see the `parallel` module). The result is
    /// identical, byte for byte, to [`State::execute_sequential`].
    pub fn execute(&self, env: &BlockEnv, txs: &[Transaction]) -> Result<Execution> {
        let base = self.check_parent(env)?;
        let valid = verify_transactions(txs, self.sig_cache.as_deref());
        match parallel::execute(self, env, base, txs, &valid)? {
            Some(execution) => Ok(execution),
            // The block's shape (the proposer sends) or a credit overflow needs the one-thread
            // order; rare, and the result is the same by definition.
            None => self.run_sequential(env, base, txs, &valid),
        }
    }

    /// The parallel executor alone: `None` when the block must run sequentially.
    #[cfg(test)]
    fn execute_parallel(&self, env: &BlockEnv, txs: &[Transaction]) -> Result<Option<Execution>> {
        let base = self.check_parent(env)?;
        let valid = verify_transactions(txs, self.sig_cache.as_deref());
        parallel::execute(self, env, base, txs, &valid)
    }

    /// The reference executor: every transaction in block order on one thread, with
    /// signatures verified like [`State::execute`] does.
    pub fn execute_sequential(&self, env: &BlockEnv, txs: &[Transaction]) -> Result<Execution> {
        let base = self.check_parent(env)?;
        let valid = verify_transactions(txs, self.sig_cache.as_deref());
        self.run_sequential(env, base, txs, &valid)
    }

    /// Stages the state version of `execution` into `batch`: one sorted, batched update of
    /// the tree with every changed account (and the registry, if it changed). Returns the
    /// block's outcome with the new state root.
    pub fn stage(&self, execution: Execution, batch: &mut WriteBatch) -> Result<BlockOutcome> {
        self.stage_fresh(execution, batch)
            .map(|(outcome, _)| outcome)
    }

    /// [`State::stage`], also returning the upper tree levels the version wrote: once `batch`
    /// is committed, [`StateTree::cache_committed`] keeps them in memory for the next block.
    pub fn stage_fresh(
        &self,
        execution: Execution,
        batch: &mut WriteBatch,
    ) -> Result<(BlockOutcome, FreshNodes)> {
        let Execution {
            height,
            base,
            receipts,
            changed,
            slashed,
            registry,
            read,
        } = execution;
        let mut updates: Vec<(Hash, Option<Vec<u8>>)> = changed
            .par_iter()
            .map(|(a, acc)| (account_key(a), Some(acc.encode())))
            .collect();
        if let Some(bytes) = registry {
            updates.push((ValidatorRegistry::key(), Some(bytes)));
        }
        let (state_root, fresh) =
            self.tree
                .apply_fresh(Some(base), height, &updates, read.0.as_deref(), batch)?;
        tracing::debug!(
            height,
            txs = receipts.len(),
            changed = changed.len(),
            slashed = slashed.len(),
            root = %state_root,
            "executed block"
        );
        let outcome = BlockOutcome {
            receipts,
            state_root,
            changed,
            slashed,
        };
        Ok((outcome, fresh))
    }

    /// The parent version of `env.height`, which must be stored.
    fn check_parent(&self, env: &BlockEnv) -> Result<u64> {
        let base = env.height.checked_sub(1).ok_or(Error::GenesisHeight)?;
        // Fail early (before any work) if the parent state is not there.
        self.tree.root(base)?;
        Ok(base)
    }

    fn run_sequential(
        &self,
        env: &BlockEnv,
        base: u64,
        txs: &[Transaction],
        valid: &[bool],
    ) -> Result<Execution> {
        let mut block = BlockRun::new(self, env, base, FastMap::default());
        block.apply_evidence()?;
        let mut receipts = Vec::with_capacity(txs.len());
        for (i, (tx, sig_ok)) in txs.iter().zip(valid).enumerate() {
            receipts.push(run_tx(&mut block, &self.params, env, i, tx, *sig_ok)?);
        }
        block.finish(receipts)
    }

    /// [`State::load_slot`] for many accounts: one batched, parallel walk of the tree.
    fn load_slots(
        &self,
        addrs: &[Address],
        base: u64,
        height: u64,
    ) -> Result<(FastMap<Address, Slot>, TreeReads)> {
        let keys: Vec<Hash> = addrs.par_iter().map(account_key).collect();
        let (values, read) = self.tree.get_many_for_update(base, &keys)?;
        let slots = addrs
            .par_iter()
            .zip(values)
            .map(|(addr, bytes)| {
                let stored = bytes.map(|b| Account::decode(&b)).transpose()?;
                Ok((*addr, Slot::loaded(stored, height)))
            })
            .collect::<Result<_>>()?;
        Ok((slots, TreeReads(Some(Arc::new(read)))))
    }

    /// The account of `addr` as this block first sees it: as stored at `base`, with
    /// unbonding matured at `height` credited.
    fn load_slot(&self, addr: &Address, base: u64, height: u64) -> Result<Slot> {
        Ok(Slot::loaded(self.account(addr, base)?, height))
    }
}

/// A block's effects before they reach the tree: what [`State::execute`] computes and
/// [`State::stage`] writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Execution {
    /// The version this produces (the block height).
    pub height: u64,
    /// The version it was executed on.
    pub base: u64,
    /// One receipt per transaction, in block order.
    pub receipts: Vec<Receipt>,
    /// Every account to write, by ascending address.
    pub changed: Vec<(Address, Account)>,
    /// Validators slashed and jailed by the block's evidence, with the amounts burned.
    pub slashed: Vec<(Address, u64)>,
    /// The new validator registry bytes, if the block's bonds registered anyone new.
    pub registry: Option<Vec<u8>>,
    /// Tree nodes read while loading the accounts, for [`State::stage`].
    read: TreeReads,
}

impl Execution {
    /// Estimated bytes it holds: the receipts (and their error messages), the changed
    /// accounts (and their unbonding lists), the slashings, the new registry and the tree
    /// nodes read. The node counts them in the pending blocks' memory while the block is
    /// staged.
    pub fn memory_bytes(&self) -> u64 {
        use std::mem::size_of;
        let receipts = self.receipts.iter().fold(
            (self.receipts.capacity() * size_of::<Receipt>()) as u64,
            |sum, r| sum.saturating_add(r.error.as_ref().map_or(0, String::capacity) as u64),
        );
        let changed = self.changed.iter().fold(
            (self.changed.capacity() * size_of::<(Address, Account)>()) as u64,
            |sum, (_, account)| {
                sum.saturating_add((account.unbonding.capacity() * size_of::<Unbonding>()) as u64)
            },
        );
        let slashed = (self.slashed.capacity() * size_of::<(Address, u64)>()) as u64;
        let registry = self.registry.as_ref().map_or(0, Vec::capacity) as u64;
        let read = self.read.0.as_ref().map_or(0, |r| r.memory_bytes());
        receipts
            .saturating_add(changed)
            .saturating_add(slashed)
            .saturating_add(registry)
            .saturating_add(read)
    }
}

/// Tree nodes an execution read (leaves and deep internal nodes), so that staging its
/// changes does not read them again. A hint, not part of what the block did: two executions
/// are equal whatever they happened to read.
#[derive(Clone, Default)]
struct TreeReads(Option<Arc<ReadNodes>>);

impl PartialEq for TreeReads {
    fn eq(&self, _: &TreeReads) -> bool {
        true
    }
}

impl Eq for TreeReads {}

impl std::fmt::Debug for TreeReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} nodes read", self.0.as_ref().map_or(0, |r| r.len()))
    }
}

/// An account as loaded in this block.
#[derive(Clone, Debug)]
struct Slot {
    /// What the tree holds at the parent version.
    stored: Option<Account>,
    /// The account now, matured unbonding credited.
    current: Account,
    /// Whether evidence or a transaction that was not rejected wrote it.
    dirty: bool,
}

impl Slot {
    /// A slot for an account first loaded by the block at `height`: matured unbonding is
    /// credited (in the slot only; it reaches the tree with the account's next write).
    fn loaded(stored: Option<Account>, height: u64) -> Slot {
        let mut current = stored.clone().unwrap_or_default();
        current.release_matured(height);
        Slot {
            stored,
            current,
            dirty: false,
        }
    }
}

/// The slot of `addr` in `accounts`, loaded from `state` at `base` on first use.
fn slot_in<'m>(
    accounts: &'m mut FastMap<Address, Slot>,
    state: &State,
    addr: &Address,
    base: u64,
    height: u64,
) -> Result<&'m mut Slot> {
    use std::collections::hash_map::Entry;
    match accounts.entry(*addr) {
        Entry::Occupied(e) => Ok(e.into_mut()),
        Entry::Vacant(e) => Ok(e.insert(state.load_slot(addr, base, height)?)),
    }
}

/// Where the rules read and write accounts: the whole block on one thread ([`BlockRun`]), or
/// one group of the parallel executor.
trait Ledger {
    /// The account of `addr` as of now in this run, loaded on first use.
    fn slot(&mut self, addr: &Address) -> Result<&mut Slot>;
    /// Whether `addr` only receives credits in this run: its credits are collected (in
    /// [`Ledger::credits`]) and summed into it after the run instead of being applied in
    /// order, which is exact because nothing in the run reads it.
    fn credit_only(&self, addr: &Address) -> bool;
    /// Credits collected for credit-only accounts, in order.
    fn credits(&mut self) -> &mut Vec<(Address, u64)>;
    /// Keys of the senders of successful positive bonds, registered at the end of the block.
    fn bonded(&mut self) -> &mut BTreeMap<Address, PublicKey>;
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
    accounts: Vec<(Address, Account)>,
    /// Credits to credit-only accounts.
    credits: Vec<(Address, u64)>,
    /// A bonder's key, to register if the phase commits.
    register: Option<PublicKey>,
}

impl Overlay {
    fn put(&mut self, addr: Address, account: Account) {
        match self.accounts.iter_mut().find(|(a, _)| *a == addr) {
            Some(slot) => slot.1 = account,
            None => self.accounts.push((addr, account)),
        }
    }
}

fn get<L: Ledger>(ledger: &mut L, overlay: &Overlay, addr: &Address) -> Result<Account> {
    match overlay.accounts.iter().find(|(a, _)| a == addr) {
        Some((_, account)) => Ok(account.clone()),
        None => Ok(ledger.slot(addr)?.current.clone()),
    }
}

fn commit<L: Ledger>(ledger: &mut L, overlay: Overlay) -> Result<()> {
    if let Some(key) = overlay.register {
        ledger.bonded().entry(key.address()).or_insert(key);
    }
    for (addr, account) in overlay.accounts {
        let slot = ledger.slot(&addr)?;
        slot.current = account;
        slot.dirty = true;
    }
    ledger.credits().extend(overlay.credits);
    Ok(())
}

/// Adds `amount` to `addr`'s balance in `overlay`, or `Err(overflow)` if it cannot.
fn credit<L: Ledger>(
    ledger: &mut L,
    overlay: &mut Overlay,
    addr: Address,
    amount: u64,
    overflow: &str,
) -> Result<std::result::Result<(), String>> {
    if ledger.credit_only(&addr) {
        overlay.credits.push((addr, amount));
        return Ok(Ok(()));
    }
    let mut account = get(ledger, overlay, &addr)?;
    let Some(balance) = account.balance.checked_add(amount) else {
        return Ok(Err(overflow.into()));
    };
    account.balance = balance;
    overlay.put(addr, account);
    Ok(Ok(()))
}

/// Runs transaction `index` and makes its receipt.
fn run_tx<L: Ledger>(
    ledger: &mut L,
    params: &ExecParams,
    env: &BlockEnv,
    index: usize,
    tx: &Transaction,
    sig_ok: bool,
) -> Result<Receipt> {
    let position = u32::try_from(index).map_err(|_| Error::TooManyTransactions(index))?;
    let (success, error, fee) = execute_tx(ledger, params, env, tx, sig_ok)?;
    Ok(Receipt {
        tx_hash: tx.hash,
        height: env.height,
        index: position,
        success,
        error,
        fee,
    })
}

/// Runs one transaction. `Err` only for storage failures; rule violations are receipts.
fn execute_tx<L: Ledger>(
    ledger: &mut L,
    params: &ExecParams,
    env: &BlockEnv,
    tx: &Transaction,
    sig_ok: bool,
) -> Result<TxResult> {
    if tx.chain_id != params.chain_id {
        return rejected("wrong chain id".into());
    }
    if !sig_ok {
        return rejected("invalid signature".into());
    }
    let min_fee = params.min_fee;
    let mut sender = ledger.slot(&tx.sender)?.current.clone();
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
    overlay.put(tx.sender, sender);
    let overflow = "fee would overflow the proposer's balance";
    if let Err(reason) = credit(ledger, &mut overlay, env.proposer, tx.fee, overflow)? {
        return rejected(reason);
    }
    commit(ledger, overlay)?;

    // Action phase: on failure the fee stays paid and the nonce used.
    match action(ledger, params, env, tx)? {
        Ok(overlay) => {
            commit(ledger, overlay)?;
            Ok((true, None, tx.fee))
        }
        Err(reason) => Ok((false, Some(reason), tx.fee)),
    }
}

/// The effect of a transaction's action, or why it fails.
fn action<L: Ledger>(
    ledger: &mut L,
    params: &ExecParams,
    env: &BlockEnv,
    tx: &Transaction,
) -> Result<std::result::Result<Overlay, String>> {
    let mut overlay = Overlay::default();
    let mut sender = get(ledger, &overlay, &tx.sender)?;
    match tx.kind {
        TxKind::Transfer { to, amount } => {
            let Some(balance) = sender.balance.checked_sub(amount) else {
                return Ok(Err("insufficient funds".into()));
            };
            sender.balance = balance;
            overlay.put(tx.sender, sender);
            // Reads the sender from the overlay when sending to oneself.
            let overflow = "recipient balance would overflow";
            if let Err(reason) = credit(ledger, &mut overlay, to, amount, overflow)? {
                return Ok(Err(reason));
            }
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
            overlay.put(tx.sender, sender);
            if amount > 0 {
                overlay.register = Some(tx.public_key);
            }
        }
        TxKind::Unbond { amount } => {
            let Some(stake) = sender.stake.checked_sub(amount) else {
                return Ok(Err("insufficient stake".into()));
            };
            let Some(release_height) = env.height.checked_add(params.unbonding_period) else {
                return Ok(Err("release height would overflow".into()));
            };
            sender.stake = stake;
            if amount > 0 {
                sender.unbonding.push(Unbonding {
                    amount,
                    release_height,
                });
            }
            overlay.put(tx.sender, sender);
        }
    }
    Ok(Ok(overlay))
}

/// One block's execution on one thread: the account cache, the registry, evidence and the
/// end of the block. The parallel executor uses it for the evidence and the end too.
struct BlockRun<'s> {
    state: &'s State,
    env: &'s BlockEnv,
    base: u64,
    accounts: FastMap<Address, Slot>,
    /// The registry at `base`, loaded on first use.
    registry: Option<ValidatorRegistry>,
    /// Keys of the senders of this block's successful positive bonds, registered (those not
    /// yet registered) in one write at the end.
    bonded: BTreeMap<Address, PublicKey>,
    /// Always empty: nothing is credit-only on one thread.
    credits: Vec<(Address, u64)>,
    /// Offenders slashed so far, with the amounts burned.
    slashed: Vec<(Address, u64)>,
}

impl Ledger for BlockRun<'_> {
    fn slot(&mut self, addr: &Address) -> Result<&mut Slot> {
        slot_in(
            &mut self.accounts,
            self.state,
            addr,
            self.base,
            self.env.height,
        )
    }

    fn credit_only(&self, _: &Address) -> bool {
        false
    }

    fn credits(&mut self) -> &mut Vec<(Address, u64)> {
        &mut self.credits
    }

    fn bonded(&mut self) -> &mut BTreeMap<Address, PublicKey> {
        &mut self.bonded
    }
}

impl<'s> BlockRun<'s> {
    fn new(
        state: &'s State,
        env: &'s BlockEnv,
        base: u64,
        accounts: FastMap<Address, Slot>,
    ) -> BlockRun<'s> {
        BlockRun {
            state,
            env,
            base,
            accounts,
            registry: None,
            bonded: BTreeMap::new(),
            credits: Vec::new(),
            slashed: Vec::new(),
        }
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
            let slot = self.slot(&offender)?;
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

    /// The block's effects, with `receipts` in block order.
    fn finish(mut self, receipts: Vec<Receipt>) -> Result<Execution> {
        let registry = self.registry_update()?;
        let (height, base) = (self.env.height, self.base);
        let slashed = std::mem::take(&mut self.slashed);
        Ok(Execution {
            height,
            base,
            receipts,
            changed: self.changed(),
            slashed,
            registry,
            read: TreeReads::default(),
        })
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
        out.par_sort_unstable_by_key(|a| a.0);
        out
    }
}

#[cfg(test)]
mod tests;
