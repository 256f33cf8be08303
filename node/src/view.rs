//! The read-only view of the chain that RPC, metrics and the network server read: the tip,
//! the final block, the epoch and the non-final blocks. The consensus host builds a new view
//! after each step that changes it and swaps it in; readers clone an `Arc` and never wait on
//! the host, whatever it is writing to disk. The cell exports the view's heights and epoch as
//! metrics, read the same way at scrape time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, RwLock};

use keel_types::{Block, Hash, QuorumCertificate};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::metrics::encode_gauge;

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
    /// The certificate that made the final block final (of its child, in `blocks`), for
    /// light-client proofs of the newest final height; None until consensus made one.
    pub commit_qc: Option<QuorumCertificate>,
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
            commit_qc: None,
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

/// `keel_block_height`, `keel_finalized_height` and `keel_epoch` of the current view.
impl Collector for ViewCell {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let view = self.load();
        encode_gauge(
            &mut encoder,
            "keel_block_height",
            "Height of the latest certified block",
            view.tip.latest.0,
        )?;
        encode_gauge(
            &mut encoder,
            "keel_finalized_height",
            "Height of the latest final block",
            view.tip.finalized.0,
        )?;
        encode_gauge(
            &mut encoder,
            "keel_epoch",
            "Current consensus epoch",
            view.epoch,
        )
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::metrics::render;

    #[test]
    fn the_view_cell_exports_the_heights_and_epoch_of_the_view_it_holds() {
        let cell = Arc::new(ViewCell::new(ChainView::at_final(
            (4, Hash::digest(b"4")),
            1,
        )));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(cell.clone()));
        let mut view = ChainView::at_final((7, Hash::digest(b"7")), 2);
        view.tip.latest = (9, Hash::digest(b"9"));
        // A scrape reads the view published last.
        cell.store(view);
        let text = render(&registry);
        for part in [
            "# HELP keel_block_height Height of the latest certified block.\n\
             # TYPE keel_block_height gauge\nkeel_block_height 9\n",
            "# HELP keel_finalized_height Height of the latest final block.\n\
             # TYPE keel_finalized_height gauge\nkeel_finalized_height 7\n",
            "# HELP keel_epoch Current consensus epoch.\n# TYPE keel_epoch gauge\nkeel_epoch 2\n",
        ] {
            assert!(text.contains(part), "{part} missing from\n{text}");
        }
    }
}
