//! What a node serves to a peer that syncs: final blocks from the store, the non-final branch
//! from the chain view, and the proof that the asker's epoch ended. The libp2p server and the
//! seeded simulation answer block requests with this same function.

use keel_consensus::epoch_of_next_block;
use keel_types::{Hash, PeerResponse, MAX_SYNC_BLOCKS};

use crate::context::NodeContext;
use crate::Result;

/// Blocks for a peer whose final height is `have_height` and who wants `target`: final
/// blocks above its height first (by height), then the non-final branch to `target`; oldest
/// first, at most `max` (capped at [`MAX_SYNC_BLOCKS`]), and the proof that the asker's
/// epoch ended if this node has it; [`PeerResponse::Pruned`] if the asker needs final blocks
/// this node has pruned. Reads the store and the chain view, never the host.
pub fn serve_blocks(
    chain: &NodeContext,
    target: Hash,
    have_height: u64,
    max: u32,
) -> Result<PeerResponse> {
    let max = max.clamp(1, MAX_SYNC_BLOCKS) as usize;
    // Final blocks it lacks that this node has pruned: say so, the asker tries elsewhere.
    let earliest = chain.prune_status().earliest();
    if have_height.saturating_add(1) < earliest {
        return Ok(PeerResponse::Pruned { earliest });
    }
    let view = chain.view();
    let finalized = view.tip.finalized.0;
    let mut blocks = Vec::new();
    let mut h = have_height.saturating_add(1);
    while h <= finalized && blocks.len() < max {
        match chain.blocks.block_at(h)? {
            Some(b) => blocks.push(b),
            None => break,
        }
        h += 1;
    }
    if blocks.len() < max {
        let mut path = Vec::new();
        let mut cursor = target;
        while let Some(b) = view.blocks.get(&cursor) {
            if b.header.height <= finalized
                || path.len() as u64 > crate::ledger::MAX_PENDING_HEIGHTS
            {
                break;
            }
            cursor = b.header.parent_hash;
            path.push(b);
        }
        path.reverse();
        let base = have_height.max(finalized);
        blocks.extend(
            path.into_iter()
                .filter(|b| b.header.height > base)
                .take(max - blocks.len())
                .map(|b| (**b).clone()),
        );
    }
    let epoch = epoch_of_next_block(have_height, chain.params.epoch_length);
    let proof = chain.records().epoch_proof(epoch)?;
    Ok(PeerResponse::Blocks { blocks, proof })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use keel_types::Hash;

    use super::*;
    use crate::context::tests::chain_pruned;
    use crate::pruner::PruneStatus;

    /// A peer whose final height is below this node's earliest height is told so, with that
    /// height; one at or above it gets blocks as usual.
    #[test]
    fn a_peer_needing_pruned_blocks_is_answered_pruned() {
        let (chain, _) = chain_pruned(Arc::new(PruneStatus::new(Some(100), None)));
        let target = Hash::digest(b"wanted");
        assert_eq!(
            serve_blocks(&chain, target, 3, 32).unwrap(),
            PeerResponse::Pruned { earliest: 101 }
        );
        assert_eq!(
            serve_blocks(&chain, target, 99, 32).unwrap(),
            PeerResponse::Pruned { earliest: 101 }
        );
        assert!(matches!(
            serve_blocks(&chain, target, 100, 32).unwrap(),
            PeerResponse::Blocks { .. }
        ));
        // Nothing pruned: everything is served.
        let (chain, _) = chain_pruned(Arc::default());
        assert!(matches!(
            serve_blocks(&chain, target, 0, 32).unwrap(),
            PeerResponse::Blocks { .. }
        ));
    }
}
