//! `keel db stats|prune|compact|check --home DIR`: tools over the database of a stopped node.
//! RocksDB locks its folder, so each fails with a clear error while the node runs.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use keel_state::StateTree;
use keel_storage::{BlockStore, Column, KvStore, RocksStore};
use serde::Serialize;

use crate::config::{Config, PruningMode, StorageEngine};
use crate::home::Home;
use crate::pruner::{PassReport, PruneStatus, Pruner, Window};
use crate::{Error, Result};

/// A stopped node's database, opened with its configuration.
pub struct Db {
    config: Config,
    epoch_length: u64,
    store: Arc<RocksStore>,
}

/// Sizes of one column family.
#[derive(Clone, Debug, Serialize)]
pub struct ColumnStats {
    /// Its name on disk.
    pub name: &'static str,
    /// Bytes of its live table files.
    pub live_sst_bytes: u64,
    /// RocksDB's estimate of its keys.
    pub estimated_keys: u64,
}

/// What `keel db stats` prints.
#[derive(Clone, Debug, Serialize)]
pub struct DbStats {
    /// The database folder.
    pub path: String,
    /// Bytes on disk (tables, logs, manifests).
    pub disk_bytes: u64,
    /// Live table bytes over every column family.
    pub live_sst_bytes: u64,
    /// Per column family.
    pub columns: Vec<ColumnStats>,
    /// The final height.
    pub finalized_height: u64,
    /// The lowest height served (0 unless pruned).
    pub earliest_height: u64,
    /// Every height at or below this one is pruned (absent: none is).
    pub pruned_height: Option<u64>,
    /// The target of the latest prune pass, if one ever started; above `pruned_height` when a
    /// pass was interrupted (the node finishes it at start).
    pub prune_target: Option<u64>,
    /// `[storage.pruning] mode`.
    pub pruning_mode: &'static str,
    /// Blocks kept (absent in archive mode).
    pub keep_recent: Option<u64>,
    /// Prune interval (absent in archive mode).
    pub interval: Option<u64>,
    /// The height the next prune pass will reach, if one is due now.
    pub prune_due_to: Option<u64>,
}

/// What `keel db check` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// The lowest height checked.
    pub from_height: u64,
    /// The final height (the last checked).
    pub to_height: u64,
    /// Blocks read back and checked (header, body, receipts, transaction index).
    pub blocks: u64,
    /// Transactions whose index entry and receipt were checked.
    pub transactions: u64,
    /// State versions whose root was recomputed from their nodes.
    pub state_versions: u64,
    /// Distinct state-tree nodes hashed.
    pub state_nodes: u64,
    /// Epoch-end headers kept below the window, checked.
    pub epoch_headers: u64,
}

impl Db {
    /// Opens the database of the node at `home` (which must be stopped).
    pub fn open(home: &Path) -> Result<Db> {
        let home = Home::new(home);
        let config = Config::load(&home.config())?;
        if config.storage.engine == StorageEngine::Memory {
            return Err(Error::Unusable(
                "storage.engine is \"memory\": this node keeps no database on disk".into(),
            ));
        }
        let genesis = home.load_genesis()?;
        let data = home.data();
        if !data.join("CURRENT").exists() {
            return Err(Error::Unusable(format!(
                "no database in {} (has the node been started?)",
                data.display()
            )));
        }
        let store = Arc::new(RocksStore::open(
            &data,
            &crate::node::rocks_config(&config),
        )?);
        Ok(Db {
            config,
            epoch_length: genesis.params.epoch_length,
            store,
        })
    }

    fn kv(&self) -> Arc<dyn KvStore> {
        self.store.clone()
    }

    fn window(&self) -> Option<Window> {
        Window::of(&self.config.storage.pruning)
    }

    fn pruner(&self) -> Result<Pruner> {
        let blocks = BlockStore::new(self.kv());
        let status = Arc::new(PruneStatus::load(&blocks)?);
        Ok(Pruner::new(self.kv(), self.epoch_length, status))
    }

    /// Sizes, key estimates and pruning progress.
    pub fn stats(&self) -> Result<DbStats> {
        let blocks = BlockStore::new(self.kv());
        let columns: Vec<ColumnStats> = Column::ALL
            .iter()
            .map(|c| ColumnStats {
                name: c.name(),
                live_sst_bytes: self.store.live_sst_bytes(*c).unwrap_or(0),
                estimated_keys: self.store.estimate_keys(*c).unwrap_or(0),
            })
            .collect();
        let status = PruneStatus::load(&blocks)?;
        let window = self.window();
        Ok(DbStats {
            path: self.store.path().display().to_string(),
            disk_bytes: self.store.disk_size_bytes()?,
            live_sst_bytes: columns.iter().map(|c| c.live_sst_bytes).sum(),
            columns,
            finalized_height: blocks.finalized()?.map_or(0, |(h, _)| h),
            earliest_height: status.earliest(),
            pruned_height: blocks.pruned_height()?,
            prune_target: blocks.prune_target()?,
            pruning_mode: match self.config.storage.pruning.mode {
                PruningMode::Default => "default",
                PruningMode::Archive => "archive",
                PruningMode::Custom => "custom",
            },
            keep_recent: window.map(|w| w.keep_recent),
            interval: window.map(|w| w.interval),
            prune_due_to: self.pruner()?.due(window)?,
        })
    }

    /// Prunes what the configured window makes due now (or finishes an interrupted pass);
    /// `progress(done, total)` after each batch. `None` if nothing is due.
    pub fn prune(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<Option<PassReport>> {
        let pruner = self.pruner()?;
        let Some(target) = pruner.due(self.window())? else {
            return Ok(None);
        };
        Ok(Some(pruner.prune_to(target, &|| false, progress)?))
    }

    /// Compacts every column family whole; returns the live table bytes before and after.
    pub fn compact(&self) -> Result<(u64, u64)> {
        let live = |s: &RocksStore| {
            Column::ALL
                .iter()
                .map(|c| s.live_sst_bytes(*c).unwrap_or(0))
                .sum::<u64>()
        };
        let before = live(&self.store);
        for col in Column::ALL {
            self.store.compact_range(col, &[], &[0xff; 64])?;
        }
        Ok((before, live(&self.store)))
    }

    /// Walks the retained window: every block from the earliest retained height to the final
    /// one reads back whole (its hash at its height, its transactions' index entries and
    /// receipts), the state root of each of those heights is recomputed from the tree's
    /// nodes and matches its header, and every kept epoch-end header below the window is
    /// there. `progress(done, total)` now and then. The first inconsistency is an error.
    pub fn check(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<CheckReport> {
        let blocks = BlockStore::new(self.kv());
        let tree = StateTree::with_cache_capacity(self.kv(), 1 << 16);
        let status = PruneStatus::load(&blocks)?;
        let from = status.earliest();
        let to = blocks.finalized()?.map_or(0, |(h, _)| h);
        let bad = |what: String| Error::Corrupt {
            what: "database",
            reason: what,
        };
        let mut report = CheckReport {
            from_height: from,
            to_height: to,
            ..CheckReport::default()
        };
        let mut epoch_end = 0;
        while epoch_end < from {
            if blocks.hash_at(epoch_end)?.is_none() || blocks.header_at(epoch_end)?.is_none() {
                return Err(bad(format!(
                    "the epoch-end header at height {epoch_end} is missing"
                )));
            }
            report.epoch_headers += 1;
            epoch_end = epoch_end.saturating_add(self.epoch_length.max(1));
        }
        let mut checked = HashSet::new();
        let total = to.saturating_sub(from) + 1;
        for height in from..=to {
            let block = blocks
                .block_at(height)?
                .ok_or_else(|| bad(format!("no block at retained height {height}")))?;
            if block.header.height != height {
                return Err(bad(format!(
                    "the height index at {height} points at a block of height {}",
                    block.header.height
                )));
            }
            let receipts = blocks.receipts_at(height)?;
            if receipts.len() != block.txs.len() {
                return Err(bad(format!(
                    "block {height} has {} transactions and {} receipts",
                    block.txs.len(),
                    receipts.len()
                )));
            }
            for (index, tx) in (0u32..).zip(block.tx_hashes()) {
                let at = blocks.tx_location(&tx)?.ok_or_else(|| {
                    bad(format!("transaction {tx} of block {height} is not indexed"))
                })?;
                // A transaction refused at a later height keeps the entry of its inclusion.
                if at.height < height || (at.height == height && at.index != index) {
                    return Err(bad(format!(
                        "transaction {tx} of block {height} is indexed at {}:{}",
                        at.height, at.index
                    )));
                }
                report.transactions += 1;
            }
            let (root, hashed) = tree
                .verify_version(height, &mut checked)
                .map_err(|e| bad(format!("state of height {height}: {e}")))?;
            if root != block.header.state_root {
                return Err(bad(format!(
                    "state of height {height} has root {root}, its header says {}",
                    block.header.state_root
                )));
            }
            report.blocks += 1;
            report.state_versions += 1;
            report.state_nodes += hashed as u64;
            if height % 100 == 0 || height == to {
                progress(height - from + 1, total);
            }
        }
        Ok(report)
    }
}
