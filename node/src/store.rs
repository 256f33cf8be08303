//! The one home of every storage key the node writes outside the block store: safety data
//! (written with fsync), the non-final blocks kept for a restart, the final tip's certificate,
//! the proofs that epochs ended, the genesis hash, and the peer book. Nothing else in the node
//! builds these keys.
//!
//! Layout (column, key):
//! - `consensus`, `safety`: the engine's [`SafetyData`];
//! - `consensus`, `block/<hash>`: a non-final block this node executed;
//! - `consensus`, `epoch_proof/<epoch, big-endian>`: the proof that the epoch ended;
//! - `consensus`, `validator_set/<epoch, big-endian>`: the epoch's validators, each as
//!   address (20) ++ public key (32) ++ stake (8, big-endian): read from state at the epoch's
//!   start once and kept, so the sets outlive the pruned state they came from;
//! - `meta`, `latest_qc`: the certificate of the final tip (written with it, one batch);
//! - `meta`, `genesis_hash`: the hash of the genesis block the database was made for;
//! - `peers`, `<peer id bytes>`: score (i32 LE) and ban end (u64 LE, ms).

use std::sync::Arc;

use keel_consensus::{SafetyData, Validator, ValidatorSet};
use keel_p2p::peers::PeerRecord;
use keel_p2p::{PeerId, PeerStore};
use keel_storage::{BlockStore, Column, KvStore, WriteBatch};
use keel_types::{
    Address, Block, ConsensusMessage, EpochProof, Hash, PublicKey, QuorumCertificate,
};
use tracing::warn;

use crate::{Error, Result};

const SAFETY_KEY: &[u8] = b"safety";
const PENDING_BLOCK_PREFIX: &[u8] = b"block/";
const EPOCH_PROOF_PREFIX: &[u8] = b"epoch_proof/";
const VALIDATOR_SET_PREFIX: &[u8] = b"validator_set/";
/// Bytes of one validator in a validator-set record.
const VALIDATOR_RECORD: usize = 20 + 32 + 8;
const LATEST_QC_KEY: &str = "latest_qc";
const GENESIS_HASH_KEY: &str = "genesis_hash";

fn pending_key(hash: &Hash) -> Vec<u8> {
    [PENDING_BLOCK_PREFIX, hash.as_bytes()].concat()
}

fn epoch_proof_key(epoch: u64) -> Vec<u8> {
    [EPOCH_PROOF_PREFIX, &epoch.to_be_bytes()].concat()
}

fn corrupt(what: &'static str, error: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        what,
        reason: error.to_string(),
    }
}

/// Typed access to the consensus-side records of one database.
#[derive(Clone)]
pub struct ConsensusStore {
    kv: Arc<dyn KvStore>,
    blocks: BlockStore,
}

impl ConsensusStore {
    /// The records of `kv`.
    pub fn new(kv: Arc<dyn KvStore>) -> ConsensusStore {
        ConsensusStore {
            blocks: BlockStore::new(kv.clone()),
            kv,
        }
    }

    /// The underlying store.
    pub fn kv(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }

    /// The recorded validator set of `epoch`, if any.
    pub fn validator_set(&self, epoch: u64) -> Result<Option<ValidatorSet>> {
        let key = [VALIDATOR_SET_PREFIX, &epoch.to_be_bytes()].concat();
        let Some(bytes) = self.kv.get(Column::Consensus, &key)? else {
            return Ok(None);
        };
        if bytes.is_empty() || bytes.len() % VALIDATOR_RECORD != 0 {
            return Err(corrupt(
                "validator set record",
                format!("epoch {epoch}: {} bytes", bytes.len()),
            ));
        }
        let validators = bytes
            .chunks_exact(VALIDATOR_RECORD)
            .map(|v| {
                let (address, rest) = v.split_at(20);
                let (key, stake) = rest.split_at(32);
                Ok(Validator {
                    address: Address::from_slice("address", address)
                        .map_err(|e| corrupt("validator set record", e))?,
                    public_key: PublicKey::from_bytes(key)
                        .map_err(|e| corrupt("validator set record", e))?,
                    stake: u64::from_be_bytes(
                        <[u8; 8]>::try_from(stake)
                            .map_err(|e| corrupt("validator set record", e))?,
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(
            ValidatorSet::new(validators).map_err(|e| corrupt("validator set record", e))?,
        ))
    }

    /// Records the validator set of `epoch`.
    pub fn save_validator_set(&self, epoch: u64, set: &ValidatorSet) -> Result<()> {
        let key = [VALIDATOR_SET_PREFIX, &epoch.to_be_bytes()].concat();
        let mut value = Vec::with_capacity(set.validators().len() * VALIDATOR_RECORD);
        for v in set.validators() {
            value.extend_from_slice(&v.address.0);
            value.extend_from_slice(&v.public_key.to_bytes());
            value.extend_from_slice(&v.stake.to_be_bytes());
        }
        self.kv.put(Column::Consensus, &key, &value)?;
        Ok(())
    }

    /// The safety data of the last run, if any.
    pub fn safety(&self) -> Result<Option<SafetyData>> {
        match self.kv.get(Column::Consensus, SAFETY_KEY)? {
            Some(bytes) => Ok(Some(SafetyData::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Writes the safety data with fsync, which also makes every earlier write durable (the
    /// pending blocks a vote depends on).
    pub fn save_safety(&self, safety: &SafetyData) -> Result<()> {
        let mut batch = WriteBatch::new();
        batch.put(Column::Consensus, SAFETY_KEY, safety.encode());
        batch.set_sync(true);
        Ok(self.kv.write(batch)?)
    }

    /// Keeps a non-final block for a restart.
    pub fn put_pending(&self, block: &Block) -> Result<()> {
        Ok(self.kv.put(
            Column::Consensus,
            &pending_key(&block.hash()),
            &block.encode(),
        )?)
    }

    /// Stages forgetting non-final blocks (final now, or abandoned).
    pub fn stage_delete_pending(
        &self,
        batch: &mut WriteBatch,
        hashes: impl IntoIterator<Item = Hash>,
    ) {
        for hash in hashes {
            batch.delete(Column::Consensus, pending_key(&hash));
        }
    }

    /// Forgets non-final blocks.
    pub fn delete_pending(&self, hashes: impl IntoIterator<Item = Hash>) -> Result<()> {
        let mut batch = WriteBatch::new();
        self.stage_delete_pending(&mut batch, hashes);
        if batch.is_empty() {
            return Ok(());
        }
        Ok(self.kv.write(batch)?)
    }

    /// Every kept non-final block, oldest first. Records that do not decode are deleted
    /// (logged): they were written by this node, so only corruption produces them.
    pub fn pending_blocks(&self) -> Result<Vec<Block>> {
        let mut blocks = Vec::new();
        let mut bad = WriteBatch::new();
        for item in self.kv.iter_prefix(Column::Consensus, PENDING_BLOCK_PREFIX) {
            let (key, bytes) = item?;
            match Block::decode(&bytes) {
                Ok(b) => blocks.push(b),
                Err(e) => {
                    warn!(error = %e, key = ?key, "dropping an undecodable pending block");
                    bad.delete(Column::Consensus, key);
                }
            }
        }
        if !bad.is_empty() {
            self.kv.write(bad)?;
        }
        blocks.sort_by_key(|b| b.header.height);
        Ok(blocks)
    }

    /// The certificate of the final tip (none until the first block after genesis is final).
    pub fn latest_qc(&self) -> Result<Option<QuorumCertificate>> {
        match self.blocks.meta(LATEST_QC_KEY)? {
            Some(bytes) => {
                Ok(Some(QuorumCertificate::decode(&bytes).map_err(|e| {
                    corrupt("the certificate of the latest block", e)
                })?))
            }
            None => Ok(None),
        }
    }

    /// Stages the final tip's certificate, in the batch that writes the block.
    pub fn stage_latest_qc(&self, batch: &mut WriteBatch, qc: &QuorumCertificate) {
        self.blocks.stage_meta(batch, LATEST_QC_KEY, &qc.encode());
    }

    /// The proof that `epoch` ended, if this node has it.
    pub fn epoch_proof(&self, epoch: u64) -> Result<Option<EpochProof>> {
        let Some(bytes) = self.kv.get(Column::Consensus, &epoch_proof_key(epoch))? else {
            return Ok(None);
        };
        match ConsensusMessage::decode(&bytes) {
            Ok(ConsensusMessage::EpochProof(p)) => Ok(Some(p)),
            Ok(_) => Err(corrupt("an epoch proof", "another message kind")),
            Err(e) => Err(corrupt("an epoch proof", e)),
        }
    }

    /// Keeps the proof that `epoch` ended, for peers syncing across it.
    pub fn save_epoch_proof(&self, epoch: u64, proof: &EpochProof) -> Result<()> {
        Ok(self.kv.put(
            Column::Consensus,
            &epoch_proof_key(epoch),
            &ConsensusMessage::EpochProof(proof.clone()).encode(),
        )?)
    }

    /// The hash of the genesis block this database was made for.
    pub fn genesis_hash(&self) -> Result<Option<Hash>> {
        match self.blocks.meta(GENESIS_HASH_KEY)? {
            Some(bytes) => Ok(Some(
                Hash::from_slice(GENESIS_HASH_KEY, &bytes)
                    .map_err(|e| corrupt("the genesis hash", e))?,
            )),
            None => Ok(None),
        }
    }

    /// Stages the genesis hash, in the batch that writes genesis.
    pub fn stage_genesis_hash(&self, batch: &mut WriteBatch, hash: &Hash) {
        self.blocks
            .stage_meta(batch, GENESIS_HASH_KEY, hash.as_bytes());
    }

    /// The peer book, as the p2p service loads and saves it.
    pub fn peer_book(&self) -> PeerBook {
        PeerBook(self.kv.clone())
    }
}

/// Peer scores and bans in the `peers` column.
pub struct PeerBook(Arc<dyn KvStore>);

impl PeerBook {
    fn decode(key: &[u8], value: &[u8]) -> Option<PeerRecord> {
        let peer = PeerId::from_bytes(key).ok()?;
        let score = i32::from_le_bytes(value.get(..4)?.try_into().ok()?);
        let until = u64::from_le_bytes(value.get(4..12)?.try_into().ok()?);
        (value.len() == 12).then_some(PeerRecord {
            peer,
            score,
            banned_until_ms: until,
        })
    }
}

impl PeerStore for PeerBook {
    fn load(&self) -> Vec<PeerRecord> {
        let mut out = Vec::new();
        for item in self.0.iter_prefix(Column::Peers, b"") {
            match item {
                Ok((key, value)) => match PeerBook::decode(&key, &value) {
                    Some(r) => out.push(r),
                    None => warn!(key = ?key, "ignoring an undecodable peer record"),
                },
                Err(e) => {
                    warn!(error = %e, "could not read the peer book");
                    break;
                }
            }
        }
        out
    }

    fn save(&self, records: &[PeerRecord]) {
        let mut batch = WriteBatch::new();
        for item in self.0.iter_prefix(Column::Peers, b"").flatten() {
            batch.delete(Column::Peers, item.0);
        }
        for r in records {
            let mut value = r.score.to_le_bytes().to_vec();
            value.extend(r.banned_until_ms.to_le_bytes());
            batch.put(Column::Peers, r.peer.to_bytes(), value);
        }
        if let Err(e) = self.0.write(batch) {
            warn!(error = %e, "could not save peer scores");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use keel_storage::MemStore;
    use keel_types::{Header, Keypair};

    use super::*;

    fn block(height: u64) -> Block {
        Block {
            header: Header {
                height,
                ..Header::default()
            },
            txs: Vec::new(),
            evidence: Vec::new(),
        }
    }

    #[test]
    fn pending_blocks_come_back_oldest_first_and_go_when_deleted() {
        let store = ConsensusStore::new(Arc::new(MemStore::new()));
        let (b3, b1, b2) = (block(3), block(1), block(2));
        for b in [&b3, &b1, &b2] {
            store.put_pending(b).unwrap();
        }
        let heights: Vec<u64> = store
            .pending_blocks()
            .unwrap()
            .iter()
            .map(|b| b.header.height)
            .collect();
        assert_eq!(heights, [1, 2, 3]);
        store.delete_pending([b1.hash(), b3.hash()]).unwrap();
        assert_eq!(store.pending_blocks().unwrap(), vec![b2]);
    }

    #[test]
    fn an_undecodable_pending_record_is_dropped_not_fatal() {
        let kv: Arc<dyn KvStore> = Arc::new(MemStore::new());
        kv.put(Column::Consensus, b"block/garbage", b"\xff\xff")
            .unwrap();
        let store = ConsensusStore::new(kv.clone());
        store.put_pending(&block(1)).unwrap();
        assert_eq!(store.pending_blocks().unwrap().len(), 1);
        assert!(kv
            .get(Column::Consensus, b"block/garbage")
            .unwrap()
            .is_none());
    }

    #[test]
    fn peer_records_round_trip_and_bad_ones_are_skipped() {
        let kv: Arc<dyn KvStore> = Arc::new(MemStore::new());
        let book = ConsensusStore::new(kv.clone()).peer_book();
        let peer = keel_p2p::peer_id_of(Keypair::from_seed(1).secret()).unwrap();
        let record = PeerRecord {
            peer,
            score: -7,
            banned_until_ms: 99,
        };
        book.save(std::slice::from_ref(&record));
        kv.put(Column::Peers, b"not a peer id", b"short").unwrap();
        let loaded = book.load();
        assert_eq!(loaded.len(), 1);
        assert_eq!(
            (loaded[0].peer, loaded[0].score, loaded[0].banned_until_ms),
            (peer, -7, 99)
        );
    }

    #[test]
    fn a_corrupt_certificate_is_a_clear_error() {
        let kv: Arc<dyn KvStore> = Arc::new(MemStore::new());
        let store = ConsensusStore::new(kv.clone());
        let mut batch = WriteBatch::new();
        BlockStore::new(kv.clone()).stage_meta(&mut batch, LATEST_QC_KEY, b"\x01\x02");
        kv.write(batch).unwrap();
        let e = store.latest_qc().unwrap_err().to_string();
        assert!(e.contains("certificate of the latest block"), "{e}");
    }
}
