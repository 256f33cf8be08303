//! Typed storage of committed blocks, their indexes and receipts over any [`KvStore`].
//!
//! Key layouts (all integers big-endian, so byte order is numeric order):
//!
//! | column | key | value |
//! |---|---|---|
//! | `headers` | block hash (32) | `Header::encode()` |
//! | `bodies` | block hash (32) | `proto::Block` with `header` unset: the tx bytes only |
//! | `height_index` | height (8) | block hash (32) |
//! | `tx_index` | tx hash (32) | height (8) ++ index (4) |
//! | `receipts` | height (8) ++ index (4) | `Receipt::encode()` |
//! | `meta` | UTF-8 name | `latest`/`finalized`: height (8) ++ hash (32); others raw |
//!
//! `height_index` and `receipts` are height-prefixed, so a pruner range-deletes them by height;
//! it finds the hash-keyed entries of the same heights (headers, bodies, tx index) from the
//! height index and the block body (whose transactions name their index keys): point reads,
//! never a scan. A pruned height keeps its header and height-index entry when the caller asks
//! (epoch-end blocks: the chain of validator sets), everything else goes.
//!
//! Nothing here writes on its own: `stage_*` add to the caller's [`WriteBatch`] so one block
//! (with its state-tree nodes, added by the caller) commits in one atomic batch.

use std::sync::Arc;

use keel_types::{Block, Hash, Header, Receipt};

use crate::{Column, Error, KvStore, Result, WriteBatch};

const META_LATEST: &str = "latest";
const META_FINALIZED: &str = "finalized";
/// Every height at or below this one is pruned (absent: nothing is).
const META_PRUNED: &str = "pruned_height";
/// The height a prune in progress is taking the database to (absent: none ever started).
const META_PRUNE_TARGET: &str = "prune_target";

/// Where an included transaction sits: block height and position in the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TxLocation {
    /// Height of the block that includes it.
    pub height: u64,
    /// Position in that block's transaction list.
    pub index: u32,
}

impl TxLocation {
    fn encode(self) -> [u8; 12] {
        receipt_key(self.height, self.index)
    }

    fn decode(bytes: &[u8]) -> Result<TxLocation> {
        let (h, i) = bytes
            .split_first_chunk::<8>()
            .and_then(|(h, rest)| Some((h, <[u8; 4]>::try_from(rest).ok()?)))
            .ok_or_else(|| {
                corrupt(
                    "tx location",
                    format!("expected 12 bytes, got {}", bytes.len()),
                )
            })?;
        Ok(TxLocation {
            height: u64::from_be_bytes(*h),
            index: u32::from_be_bytes(i),
        })
    }
}

/// Blocks, headers, indexes and receipts over a shared [`KvStore`]. Cheap to clone.
#[derive(Clone)]
pub struct BlockStore {
    store: Arc<dyn KvStore>,
}

fn corrupt(what: &'static str, reason: impl ToString) -> Error {
    Error::Corrupt {
        what,
        reason: reason.to_string(),
    }
}

fn height_key(height: u64) -> [u8; 8] {
    height.to_be_bytes()
}

fn receipt_key(height: u64, index: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&height.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

fn encode_height_hash(height: u64, hash: &Hash) -> Vec<u8> {
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(&height.to_be_bytes());
    v.extend_from_slice(hash.as_bytes());
    v
}

fn decode_height_hash(what: &'static str, bytes: &[u8]) -> Result<(u64, Hash)> {
    let (h, rest) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt(what, format!("expected 40 bytes, got {}", bytes.len())))?;
    let hash = decode_hash(what, rest)?;
    Ok((u64::from_be_bytes(*h), hash))
}

fn decode_hash(what: &'static str, bytes: &[u8]) -> Result<Hash> {
    <[u8; 32]>::try_from(bytes)
        .map(Hash)
        .map_err(|_| corrupt(what, format!("hash of {} bytes", bytes.len())))
}

fn encode_body(block: &Block) -> Vec<u8> {
    block.encode_body()
}

impl BlockStore {
    /// A block store over `store`.
    pub fn new(store: Arc<dyn KvStore>) -> BlockStore {
        BlockStore { store }
    }

    /// The underlying store, to add other data to the same batches or read other columns.
    pub fn kv(&self) -> &Arc<dyn KvStore> {
        &self.store
    }

    /// Stages everything for one committed block into `batch`: header and body by hash, the
    /// height index, one tx index entry per transaction, `receipts[i]` (the receipt of
    /// `block.txs[i]`) under (height, i), and meta `latest` = (height, hash). Nothing is
    /// written until the caller writes the batch.
    pub fn stage_block(&self, batch: &mut WriteBatch, block: &Block, receipts: &[Receipt]) {
        let height = block.header.height;
        let hash = block.hash();
        batch.put(Column::Headers, hash.0.to_vec(), block.header.encode());
        batch.put(Column::Bodies, hash.0.to_vec(), encode_body(block));
        batch.put(
            Column::HeightIndex,
            height_key(height).to_vec(),
            hash.0.to_vec(),
        );
        for (index, tx_hash) in (0u32..).zip(block.tx_hashes()) {
            // A transaction already indexed and now included again by a misbehaving proposer is
            // rejected without effect (fee 0): keep the index on its real inclusion.
            let rejected = receipts
                .get(index as usize)
                .is_some_and(|r| !r.success && r.fee == 0);
            if rejected
                && matches!(
                    self.store.get(Column::TxIndex, tx_hash.as_bytes()),
                    Ok(Some(_))
                )
            {
                continue;
            }
            batch.put(
                Column::TxIndex,
                tx_hash.0.to_vec(),
                TxLocation { height, index }.encode().to_vec(),
            );
        }
        for (index, receipt) in (0u32..).zip(receipts) {
            batch.put(
                Column::Receipts,
                receipt_key(height, index).to_vec(),
                receipt.encode(),
            );
        }
        batch.put(
            Column::Meta,
            META_LATEST.as_bytes().to_vec(),
            encode_height_hash(height, &hash),
        );
    }

    /// Stages meta `finalized` = (height, hash).
    pub fn stage_finalized(&self, batch: &mut WriteBatch, height: u64, hash: Hash) {
        batch.put(
            Column::Meta,
            META_FINALIZED.as_bytes().to_vec(),
            encode_height_hash(height, &hash),
        );
    }

    /// Height and hash of the last committed block.
    pub fn latest(&self) -> Result<Option<(u64, Hash)>> {
        self.meta(META_LATEST)?
            .map(|v| decode_height_hash("latest block pointer", &v))
            .transpose()
    }

    /// Height and hash of the last finalized block.
    pub fn finalized(&self) -> Result<Option<(u64, Hash)>> {
        self.meta(META_FINALIZED)?
            .map(|v| decode_height_hash("finalized block pointer", &v))
            .transpose()
    }

    /// Hash of the committed block at `height`.
    pub fn hash_at(&self, height: u64) -> Result<Option<Hash>> {
        self.store
            .get(Column::HeightIndex, &height_key(height))?
            .map(|v| decode_hash("height index entry", &v))
            .transpose()
    }

    /// The header with hash `hash`.
    pub fn header_by_hash(&self, hash: &Hash) -> Result<Option<Header>> {
        self.store
            .get(Column::Headers, hash.as_bytes())?
            .map(|v| Header::decode(&v).map_err(|e| corrupt("header", e)))
            .transpose()
    }

    /// The header of the committed block at `height`.
    pub fn header_at(&self, height: u64) -> Result<Option<Header>> {
        let Some(hash) = self.hash_at(height)? else {
            return Ok(None);
        };
        self.header_by_hash(&hash)?.map(Some).ok_or_else(|| {
            corrupt(
                "height index entry",
                format!("height {height} points at missing header {hash}"),
            )
        })
    }

    /// The block with hash `hash`.
    pub fn block_by_hash(&self, hash: &Hash) -> Result<Option<Block>> {
        match self.header_by_hash(hash)? {
            Some(header) => self.block_with_header(header).map(Some),
            None => Ok(None),
        }
    }

    /// The block of a stored `header` (read by the caller), with its body.
    pub fn block_with_header(&self, header: Header) -> Result<Block> {
        let hash = header.hash();
        let body = self
            .store
            .get(Column::Bodies, hash.as_bytes())?
            .ok_or_else(|| corrupt("block body", format!("missing for stored header {hash}")))?;
        Block::from_header_and_body(header, &body).map_err(|e| corrupt("block body", e))
    }

    /// The committed block at `height`.
    pub fn block_at(&self, height: u64) -> Result<Option<Block>> {
        let Some(hash) = self.hash_at(height)? else {
            return Ok(None);
        };
        self.block_by_hash(&hash)?.map(Some).ok_or_else(|| {
            corrupt(
                "height index entry",
                format!("height {height} points at missing block {hash}"),
            )
        })
    }

    /// Where the transaction with hash `tx_hash` was included.
    pub fn tx_location(&self, tx_hash: &Hash) -> Result<Option<TxLocation>> {
        self.store
            .get(Column::TxIndex, tx_hash.as_bytes())?
            .map(|v| TxLocation::decode(&v))
            .transpose()
    }

    /// The receipt of transaction `index` of the block at `height`.
    pub fn receipt(&self, height: u64, index: u32) -> Result<Option<Receipt>> {
        self.store
            .get(Column::Receipts, &receipt_key(height, index))?
            .map(|v| Receipt::decode(&v).map_err(|e| corrupt("receipt", e)))
            .transpose()
    }

    /// Every receipt of the block at `height`, in transaction order (empty if none).
    pub fn receipts_at(&self, height: u64) -> Result<Vec<Receipt>> {
        self.store
            .iter_prefix(Column::Receipts, &height_key(height))
            .map(|item| {
                item.and_then(|(_, v)| Receipt::decode(&v).map_err(|e| corrupt("receipt", e)))
            })
            .collect()
    }

    /// The bytes and receipt of an included transaction.
    pub fn transaction(&self, tx_hash: &Hash) -> Result<Option<(Vec<u8>, Receipt)>> {
        let Some(loc) = self.tx_location(tx_hash)? else {
            return Ok(None);
        };
        let dangling = |what: &str| {
            corrupt(
                "tx index entry",
                format!(
                    "tx {tx_hash} at height {} index {} has no {what}",
                    loc.height, loc.index
                ),
            )
        };
        let block = self
            .block_at(loc.height)?
            .ok_or_else(|| dangling("block"))?;
        let tx = block
            .txs
            .into_iter()
            .nth(loc.index as usize)
            .ok_or_else(|| dangling("transaction in its block"))?;
        let receipt = self
            .receipt(loc.height, loc.index)?
            .ok_or_else(|| dangling("receipt"))?;
        Ok(Some((tx, receipt)))
    }

    /// Stages the deletion of the block at `height` and of everything indexed by it: its
    /// body and the transaction-index entries that point at it (an entry repointed to a later
    /// inclusion stays), and unless `keep_header`, its header and height-index entry. Its
    /// receipts are not staged here: a pruner drops them with every other pruned height's in
    /// one range ([`BlockStore::receipts_through`]). Returns the number of keys deleted,
    /// receipts included (0 if no block is stored at `height`).
    pub fn stage_prune_height(
        &self,
        batch: &mut WriteBatch,
        height: u64,
        keep_header: bool,
    ) -> Result<usize> {
        let Some(hash) = self.hash_at(height)? else {
            return Ok(0);
        };
        let mut deleted = 0;
        if let Some(block) = self.block_by_hash(&hash)? {
            let keys: Vec<Vec<u8>> = block.tx_hashes().iter().map(|h| h.0.to_vec()).collect();
            let locations = self.store.multi_get(Column::TxIndex, &keys)?;
            for (key, location) in keys.into_iter().zip(locations) {
                let points_here = location
                    .map(|v| TxLocation::decode(&v))
                    .transpose()?
                    .is_some_and(|l| l.height == height);
                if points_here {
                    batch.delete(Column::TxIndex, key);
                    deleted += 1;
                }
            }
            // Its receipts go with every other pruned height's, in one range at the end of
            // the pass (`receipts_through`).
            deleted += block.txs.len();
            batch.delete(Column::Bodies, hash.0.to_vec());
            deleted += 1;
        }
        if !keep_header {
            batch.delete(Column::Headers, hash.0.to_vec());
            batch.delete(Column::HeightIndex, height_key(height).to_vec());
            deleted += 2;
        }
        Ok(deleted)
    }

    /// The `Column::Receipts` key range `[from, to)` of the receipts of every height up to
    /// `height` (inclusive), which a pruner drops at the end of its pass. `to` is one byte
    /// longer than any receipt key, so no receipt is ever stored under it (an engine may
    /// treat table files that end at `to` as inside the range).
    pub fn receipts_through(height: u64) -> (Vec<u8>, Vec<u8>) {
        let mut to = receipt_key(height, u32::MAX).to_vec();
        to.push(0);
        (Vec::new(), to)
    }

    /// The height at or below which every block is pruned, `None` if nothing is.
    pub fn pruned_height(&self) -> Result<Option<u64>> {
        self.meta_height(META_PRUNED)
    }

    /// Records, in `batch`, that every height at or below `height` is pruned.
    pub fn stage_pruned_height(&self, batch: &mut WriteBatch, height: u64) {
        self.stage_meta(batch, META_PRUNED, &height_key(height));
    }

    /// The height the latest prune started towards (it may not have finished: compare with
    /// [`BlockStore::pruned_height`]), `None` if none ever started.
    pub fn prune_target(&self) -> Result<Option<u64>> {
        self.meta_height(META_PRUNE_TARGET)
    }

    /// Records, in `batch`, that a prune towards `height` started.
    pub fn stage_prune_target(&self, batch: &mut WriteBatch, height: u64) {
        self.stage_meta(batch, META_PRUNE_TARGET, &height_key(height));
    }

    fn meta_height(&self, key: &'static str) -> Result<Option<u64>> {
        self.meta(key)?
            .map(|v| {
                <[u8; 8]>::try_from(v.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| corrupt("prune progress", format!("{key} of {} bytes", v.len())))
            })
            .transpose()
    }

    /// Stages a small metadata value under `key` in the meta column ("genesis_hash",
    /// "latest_qc"...). `latest`, `finalized`, `pruned_height` and `prune_target` are reserved
    /// for the block pointers and the pruner's progress.
    pub fn stage_meta(&self, batch: &mut WriteBatch, key: &str, value: &[u8]) {
        batch.put(Column::Meta, key.as_bytes().to_vec(), value.to_vec());
    }

    /// The metadata value under `key`.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.store.get(Column::Meta, key.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::MemStore;

    fn block(height: u64, txs: usize) -> Block {
        let header = Header {
            chain_id: "test".into(),
            height,
            round: height,
            timestamp_ms: 1_000 + height,
            state_root: Hash::digest(&height.to_be_bytes()),
            ..Header::default()
        };
        let txs = (0..txs)
            .map(|i| format!("tx-{height}-{i}").into_bytes())
            .collect();
        Block {
            header,
            txs,
            evidence: vec![],
        }
    }

    fn receipts(block: &Block) -> Vec<Receipt> {
        (0u32..)
            .zip(block.tx_hashes())
            .map(|(index, tx_hash)| Receipt {
                tx_hash,
                height: block.header.height,
                index,
                success: index % 2 == 0,
                error: (index % 2 == 1).then(|| "insufficient funds".to_string()),
                fee: 10 + u64::from(index),
            })
            .collect()
    }

    fn commit(bs: &BlockStore, block: &Block) {
        let mut batch = WriteBatch::new();
        bs.stage_block(&mut batch, block, &receipts(block));
        bs.kv().write(batch).unwrap();
    }

    #[test]
    fn a_rejected_reinclusion_keeps_the_tx_index_on_the_real_inclusion() {
        let (mem, bs) = store();
        let first = block(1, 1);
        let tx = first.txs[0].clone();
        let ok = Receipt {
            tx_hash: Hash::digest(&tx),
            height: 1,
            index: 0,
            success: true,
            error: None,
            fee: 3,
        };
        let mut batch = WriteBatch::new();
        bs.stage_block(&mut batch, &first, &[ok]);
        mem.write(batch).unwrap();

        let mut again = block(2, 0);
        again.txs = vec![b"other".to_vec(), tx.clone()];
        let rejected = |index| Receipt {
            tx_hash: Hash::digest(&again.txs[index as usize]),
            height: 2,
            index,
            success: false,
            error: Some("bad nonce".into()),
            fee: 0,
        };
        let mut batch = WriteBatch::new();
        bs.stage_block(&mut batch, &again, &[rejected(0), rejected(1)]);
        mem.write(batch).unwrap();

        let loc = bs.tx_location(&Hash::digest(&tx)).unwrap().unwrap();
        assert_eq!(
            (loc.height, loc.index),
            (1, 0),
            "re-inclusion must not repoint the index"
        );
        // A transaction rejected the first time it is seen is still indexed, with its reason.
        let other = bs.tx_location(&Hash::digest(b"other")).unwrap().unwrap();
        assert_eq!((other.height, other.index), (2, 0));
    }

    fn store() -> (MemStore, BlockStore) {
        let mem = MemStore::new();
        (mem.clone(), BlockStore::new(Arc::new(mem)))
    }

    #[test]
    fn every_accessor_reads_back_a_committed_block() {
        let (_, bs) = store();
        let blocks: Vec<Block> = (0..3).map(|h| block(h, h as usize * 2 + 1)).collect();
        for b in &blocks {
            commit(&bs, b);
        }
        for b in &blocks {
            let h = b.header.height;
            let hash = b.hash();
            assert_eq!(bs.hash_at(h).unwrap(), Some(hash));
            assert_eq!(bs.header_by_hash(&hash).unwrap(), Some(b.header.clone()));
            assert_eq!(bs.header_at(h).unwrap(), Some(b.header.clone()));
            assert_eq!(bs.block_by_hash(&hash).unwrap(), Some(b.clone()));
            assert_eq!(bs.block_at(h).unwrap(), Some(b.clone()));
            let rs = receipts(b);
            assert_eq!(bs.receipts_at(h).unwrap(), rs);
            for (i, tx_hash) in (0u32..).zip(b.tx_hashes()) {
                assert_eq!(
                    bs.tx_location(&tx_hash).unwrap(),
                    Some(TxLocation {
                        height: h,
                        index: i
                    })
                );
                assert_eq!(bs.receipt(h, i).unwrap(), Some(rs[i as usize].clone()));
                let (tx, receipt) = bs.transaction(&tx_hash).unwrap().unwrap();
                assert_eq!(tx, b.txs[i as usize]);
                assert_eq!(receipt, rs[i as usize]);
            }
        }
        assert_eq!(bs.latest().unwrap(), Some((2, blocks[2].hash())));
    }

    #[test]
    fn empty_block_round_trips() {
        let (_, bs) = store();
        let b = block(7, 0);
        commit(&bs, &b);
        assert_eq!(bs.block_at(7).unwrap(), Some(b));
        assert_eq!(bs.receipts_at(7).unwrap(), Vec::new());
    }

    #[test]
    fn receipts_at_stays_within_its_height() {
        let (_, bs) = store();
        // Heights whose big-endian keys share long prefixes.
        for h in [0x100, 0x101, 0x1_0000_0000] {
            commit(&bs, &block(h, 3));
        }
        for h in [0x100, 0x101, 0x1_0000_0000] {
            let rs = bs.receipts_at(h).unwrap();
            assert_eq!(rs.len(), 3);
            assert!(rs.iter().all(|r| r.height == h));
        }
        assert!(bs.receipts_at(0x102).unwrap().is_empty());
    }

    #[test]
    fn nothing_is_visible_until_the_batch_is_written_then_everything_is() {
        let (mem, bs) = store();
        let b = block(1, 4);
        let mut batch = WriteBatch::new();
        bs.stage_block(&mut batch, &b, &receipts(&b));
        bs.stage_finalized(&mut batch, 1, b.hash());
        bs.stage_meta(&mut batch, "genesis_hash", b"g");
        for col in Column::ALL {
            assert_eq!(
                mem.iter_range(col, &[], None, crate::Direction::Forward)
                    .count(),
                0
            );
        }
        assert_eq!(bs.latest().unwrap(), None);

        bs.kv().write(batch).unwrap();
        assert_eq!(bs.latest().unwrap(), Some((1, b.hash())));
        assert_eq!(bs.finalized().unwrap(), Some((1, b.hash())));
        assert_eq!(bs.meta("genesis_hash").unwrap(), Some(b"g".to_vec()));
        assert_eq!(bs.block_at(1).unwrap(), Some(b.clone()));
        assert_eq!(bs.receipts_at(1).unwrap().len(), 4);
    }

    #[test]
    fn latest_and_finalized_move_independently() {
        let (_, bs) = store();
        assert_eq!(bs.latest().unwrap(), None);
        assert_eq!(bs.finalized().unwrap(), None);
        let (b1, b2) = (block(1, 0), block(2, 0));
        commit(&bs, &b1);
        commit(&bs, &b2);
        let mut batch = WriteBatch::new();
        bs.stage_finalized(&mut batch, 1, b1.hash());
        bs.kv().write(batch).unwrap();
        assert_eq!(bs.latest().unwrap(), Some((2, b2.hash())));
        assert_eq!(bs.finalized().unwrap(), Some((1, b1.hash())));
    }

    #[test]
    fn missing_entries_are_none() {
        let (_, bs) = store();
        commit(&bs, &block(1, 1));
        let unknown = Hash::digest(b"unknown");
        assert_eq!(bs.hash_at(2).unwrap(), None);
        assert_eq!(bs.header_at(2).unwrap(), None);
        assert_eq!(bs.block_at(2).unwrap(), None);
        assert_eq!(bs.header_by_hash(&unknown).unwrap(), None);
        assert_eq!(bs.block_by_hash(&unknown).unwrap(), None);
        assert_eq!(bs.tx_location(&unknown).unwrap(), None);
        assert_eq!(bs.transaction(&unknown).unwrap(), None);
        assert_eq!(bs.receipt(1, 1).unwrap(), None);
        assert_eq!(bs.receipt(2, 0).unwrap(), None);
        assert_eq!(bs.meta("pruned_height").unwrap(), None);
        assert_eq!(bs.finalized().unwrap(), None);
    }

    fn assert_corrupt<T: std::fmt::Debug>(r: Result<T>, what: &str) {
        match r {
            Err(Error::Corrupt { what: w, .. }) => assert_eq!(w, what),
            other => panic!("expected corrupt {what}, got {other:?}"),
        }
    }

    #[test]
    fn undecodable_bytes_are_corrupt_errors() {
        let (mem, bs) = store();
        let b = block(3, 2);
        commit(&bs, &b);
        let hash = b.hash();
        let tx_hash = b.tx_hashes()[0];
        let garbage: &[u8] = &[0xff, 0xff, 0xff];

        mem.put(Column::Meta, b"latest", garbage).unwrap();
        assert_corrupt(bs.latest(), "latest block pointer");
        mem.put(Column::Meta, b"finalized", &[0; 41]).unwrap();
        assert_corrupt(bs.finalized(), "finalized block pointer");
        mem.put(Column::HeightIndex, &3u64.to_be_bytes(), garbage)
            .unwrap();
        assert_corrupt(bs.hash_at(3), "height index entry");
        mem.put(Column::Headers, hash.as_bytes(), garbage).unwrap();
        assert_corrupt(bs.header_by_hash(&hash), "header");
        mem.put(Column::Headers, hash.as_bytes(), &b.header.encode())
            .unwrap();
        mem.put(Column::Bodies, hash.as_bytes(), garbage).unwrap();
        assert_corrupt(bs.block_by_hash(&hash), "block body");
        mem.put(Column::TxIndex, tx_hash.as_bytes(), garbage)
            .unwrap();
        assert_corrupt(bs.tx_location(&tx_hash), "tx location");
        mem.put(Column::Receipts, &receipt_key(3, 1), garbage)
            .unwrap();
        assert_corrupt(bs.receipt(3, 1), "receipt");
        assert_corrupt(bs.receipts_at(3), "receipt");
    }

    #[test]
    fn dangling_indexes_are_corrupt_errors() {
        let (mem, bs) = store();
        let b = block(5, 1);
        commit(&bs, &b);
        let mut batch = WriteBatch::new();
        batch.delete(Column::Bodies, b.hash().0.to_vec());
        mem.write(batch).unwrap();
        assert_corrupt(bs.block_at(5), "block body");
        assert_corrupt(bs.transaction(&b.tx_hashes()[0]), "block body");

        let mut batch = WriteBatch::new();
        batch.delete(Column::Headers, b.hash().0.to_vec());
        mem.write(batch).unwrap();
        assert_corrupt(bs.header_at(5), "height index entry");
        assert_corrupt(bs.transaction(&b.tx_hashes()[0]), "height index entry");
    }

    #[test]
    #[cfg(feature = "rocksdb")]
    fn block_store_works_over_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        let b = block(9, 3);
        {
            let rocks =
                crate::RocksStore::open(dir.path(), &crate::suite::small_rocks_config()).unwrap();
            let bs = BlockStore::new(Arc::new(rocks));
            commit(&bs, &b);
        }
        let rocks =
            crate::RocksStore::open(dir.path(), &crate::suite::small_rocks_config()).unwrap();
        let bs = BlockStore::new(Arc::new(rocks));
        assert_eq!(bs.latest().unwrap(), Some((9, b.hash())));
        assert_eq!(bs.block_at(9).unwrap(), Some(b.clone()));
        assert_eq!(bs.receipts_at(9).unwrap(), receipts(&b));
    }
}
