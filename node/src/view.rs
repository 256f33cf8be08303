//! The read-only view of the chain that RPC, metrics and the network server read: the tip,
//! the final block, the epoch and the non-final blocks. The consensus host builds a new view
//! after each step that changes it and swaps it in; readers clone an `Arc` and never wait on
//! the host, whatever it is writing to disk.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use keel_types::{Block, Hash};

/// A certified, not yet final block with what RPC reads of it computed once: its hash and
/// the hashes of its transactions (`tx_status` is polled by wallets and load generators).
#[derive(Debug)]
pub struct CertifiedBlock {
    /// The block.
    pub block: Arc<Block>,
    /// Its hash.
    pub hash: Hash,
    /// Hashes of its transactions.
    pub tx_hashes: HashSet<Hash>,
}

/// Heights and hashes of the latest and the finalized block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TipInfo {
    /// Latest certified (or final) block.
    pub latest: (u64, Hash),
    /// Latest final block.
    pub finalized: (u64, Hash),
}

/// One consistent snapshot of the chain.
#[derive(Clone, Debug)]
pub struct ChainView {
    /// The tip.
    pub tip: TipInfo,
    /// The epoch consensus is in (the epoch of the next block to be final).
    pub epoch: u64,
    /// Certified blocks above the final height, by height: the branch consensus extends.
    pub certified: BTreeMap<u64, Arc<CertifiedBlock>>,
    /// Every executed, not yet final block (certified or not), by hash: served to peers
    /// that sync.
    pub blocks: HashMap<Hash, Arc<Block>>,
}

impl ChainView {
    /// A view of a chain whose tip is final, with no blocks above it.
    pub fn at_final(finalized: (u64, Hash), epoch: u64) -> ChainView {
        ChainView {
            tip: TipInfo {
                latest: finalized,
                finalized,
            },
            epoch,
            certified: BTreeMap::new(),
            blocks: HashMap::new(),
        }
    }

    /// The certified block with this hash.
    pub fn certified_by_hash(&self, hash: &Hash) -> Option<&Arc<CertifiedBlock>> {
        self.certified.values().find(|b| b.hash == *hash)
    }

    /// Whether a certified block includes the transaction.
    pub fn includes_tx(&self, hash: &Hash) -> bool {
        self.certified.values().any(|b| b.tx_hashes.contains(hash))
    }
}

/// Where the current view lives: one writer (the host) swaps, any number of readers load.
#[derive(Debug)]
pub struct ViewCell(RwLock<Arc<ChainView>>);

impl ViewCell {
    /// A cell holding `view`.
    pub fn new(view: ChainView) -> ViewCell {
        ViewCell(RwLock::new(Arc::new(view)))
    }

    /// The current view. The lock is held only to clone the `Arc`.
    pub fn load(&self) -> Arc<ChainView> {
        match self.0.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the view.
    pub fn store(&self, view: ChainView) {
        let view = Arc::new(view);
        // The old view is dropped after the lock is released.
        let _old = match self.0.write() {
            Ok(mut v) => std::mem::replace(&mut *v, view),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), view),
        };
    }
}
