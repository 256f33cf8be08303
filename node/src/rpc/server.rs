//! [`KeelApiServer`] over the node's shared chain: what each method reads and the error
//! codes it answers with.

use std::sync::Arc;

use jsonrpsee::core::{async_trait, RpcResult, SubscriptionResult};
use jsonrpsee::server::PendingSubscriptionSink;
use jsonrpsee::types::ErrorObjectOwned;
use keel_state::account_key;
use keel_types::{Address, Block, Hash, Header, Transaction};
use tokio::sync::broadcast;

use super::api::KeelApiServer;
use super::submit::Submissions;
use super::types::{
    AccountInfo, AccountProof, BlockBody, BlockId, BlockInfo, ChainStatus, HeaderInfo, Health,
    Height, HexBytes, ReceiptInfo, SignedTxHex, TxDetail, TxInfo, TxStatus, ValidatorInfo,
};
use super::{codes, err, internal, invalid};
use crate::context::{NodeContext, SubmitError};
use crate::mempool::Rejection;

/// The JSON-RPC API served from a node's shared chain.
pub struct RpcApi {
    chain: Arc<NodeContext>,
    /// `tx_submit` calls waiting to be admitted together.
    submissions: Arc<Submissions>,
}

impl RpcApi {
    /// The API over `chain`.
    pub fn new(chain: Arc<NodeContext>) -> RpcApi {
        RpcApi {
            submissions: Submissions::new(chain.clone()),
            chain,
        }
    }

    fn block(&self, id: BlockId) -> RpcResult<Block> {
        let c = &self.chain;
        if let BlockId::Height(h) = id {
            self.check_retained(h)?;
        }
        let stored = match id {
            BlockId::Height(h) => c.blocks.block_at(h).map_err(|e| self.read_error(h, e)),
            BlockId::Hash(hash) => match c.blocks.header_by_hash(&hash) {
                // A kept epoch-end header below the window has no body any more.
                Ok(Some(header)) => {
                    let height = header.height;
                    self.check_retained(height).and_then(|()| {
                        c.blocks
                            .block_with_header(header)
                            .map(Some)
                            .map_err(|e| self.read_error(height, e))
                    })
                }
                Ok(None) => Ok(None),
                Err(e) => Err(internal(e)),
            },
        }?;
        let found = stored.or_else(|| match id {
            BlockId::Height(h) => c.certified_at(h),
            BlockId::Hash(hash) => c.certified_by_hash(&hash),
        });
        found.ok_or_else(|| match id {
            BlockId::Height(h) => err(
                codes::NOT_FOUND,
                format!("no block at height {h} (latest is {})", c.tip().latest.0),
            ),
            BlockId::Hash(hash) => err(codes::NOT_FOUND, format!("no block with hash {hash}")),
        })
    }

    /// `-32011` naming the earliest retained height if `height` is below it.
    fn check_retained(&self, height: u64) -> RpcResult<()> {
        let earliest = self.chain.prune_status().earliest();
        if height < earliest {
            return Err(pruned(height, earliest));
        }
        Ok(())
    }

    /// A read at `height` that failed: if the pruner took the height meanwhile, say so.
    fn read_error(&self, height: u64, e: impl std::fmt::Display) -> ErrorObjectOwned {
        match self.check_retained(height) {
            Err(pruned) => pruned,
            Ok(()) => internal(e),
        }
    }

    /// State is served at final heights: a certified block above them may still be replaced.
    fn state_height(&self, requested: Option<Height>) -> RpcResult<u64> {
        let finalized = self.chain.tip().finalized.0;
        match requested {
            None => Ok(finalized),
            Some(Height(h)) if h > finalized => Err(err(
                codes::NOT_FOUND,
                format!("height {h} is above the finalized height {finalized}"),
            )),
            Some(Height(h)) => {
                self.check_retained(h)?;
                Ok(h)
            }
        }
    }

    /// Streams the heads `source` yields to a subscriber until either side goes away.
    async fn stream_heads(
        &self,
        pending: PendingSubscriptionSink,
        source: fn(&NodeContext) -> broadcast::Receiver<Header>,
    ) -> SubscriptionResult {
        // Subscribed before accepting, so no head between the two is missed.
        let mut heads = source(&self.chain);
        let sink = pending.accept().await?;
        loop {
            tokio::select! {
                _ = sink.closed() => return Ok(()),
                head = heads.recv() => match head {
                    Ok(header) => {
                        let msg = serde_json::value::to_raw_value(&HeaderInfo::from(&header))?;
                        if sink.send(msg).await.is_err() {
                            return Ok(());
                        }
                    }
                    // A slow subscriber skips ahead rather than buffering without bound.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
            }
        }
    }
}

fn pruned(height: u64, earliest: u64) -> ErrorObjectOwned {
    err(
        codes::PRUNED,
        format!("height {height} is pruned: the earliest height this node serves is {earliest}"),
    )
}

impl RpcApi {
    /// A state read at `height` that failed: pruned meanwhile, or a real error.
    fn state_error(&self, height: u64, e: keel_state::Error) -> ErrorObjectOwned {
        let earliest = self.chain.prune_status().earliest();
        match e {
            _ if height < earliest => pruned(height, earliest),
            keel_state::Error::VersionNotFound(_) => err(
                codes::PRUNED,
                format!("state at height {height} is not available (pruned)"),
            ),
            other => internal(other),
        }
    }
}

fn proof_error(e: crate::light::ProofError) -> ErrorObjectOwned {
    use crate::light::ProofError;
    match e {
        ProofError::Pruned { height, earliest } => pruned(height, earliest),
        ProofError::NotFinal { .. } | ProofError::Unavailable(_) => {
            err(codes::NOT_FOUND, e.to_string())
        }
        ProofError::Storage(_) => internal(e),
    }
}

fn submit_error(e: SubmitError) -> ErrorObjectOwned {
    let code = match &e {
        SubmitError::Malformed(_) => return invalid("tx", e),
        SubmitError::BadSignature => codes::BAD_SIGNATURE,
        SubmitError::Internal(_) => codes::INTERNAL,
        SubmitError::MemoryPressure => codes::MEMORY_PRESSURE,
        SubmitError::Rejected(r) => match r {
            Rejection::Duplicate => codes::ALREADY_KNOWN,
            Rejection::WrongChain { .. } => codes::WRONG_CHAIN,
            Rejection::FeeTooLow { .. } | Rejection::Underpriced => codes::FEE_TOO_LOW,
            Rejection::NonceTooLow { .. } | Rejection::NonceTooHigh { .. } => codes::BAD_NONCE,
            Rejection::InsufficientFunds { .. } => codes::INSUFFICIENT_FUNDS,
            Rejection::Full => codes::MEMPOOL_FULL,
            Rejection::TooLarge { .. } => codes::TX_TOO_LARGE,
        },
    };
    err(code, e.to_string())
}

#[async_trait]
impl KeelApiServer for RpcApi {
    fn system_health(&self) -> RpcResult<Health> {
        Ok(Health {
            peers: self.chain.peers(),
            is_syncing: self.chain.syncing(),
        })
    }

    fn chain_status(&self) -> RpcResult<ChainStatus> {
        let c = &self.chain;
        let tip = c.tip();
        Ok(ChainStatus {
            chain_id: c.chain_id.clone(),
            node_id: c.node_id.clone(),
            latest_height: tip.latest.0,
            latest_hash: tip.latest.1,
            finalized_height: tip.finalized.0,
            finalized_hash: tip.finalized.1,
            earliest_height: c.prune_status().earliest(),
            epoch: c.epoch(),
            syncing: c.syncing(),
            peers: c.peers(),
            mempool_txs: c.mempool().len(),
            min_fee: c.params.min_fee,
        })
    }

    fn chain_get_block(&self, block: BlockId, full_txs: Option<bool>) -> RpcResult<BlockInfo> {
        let block = self.block(block)?;
        let body = if full_txs.unwrap_or(false) {
            let txs = block
                .txs
                .iter()
                .map(|b| {
                    Transaction::decode(b)
                        .map(|t| TxInfo::from(&t))
                        .map_err(internal)
                })
                .collect::<RpcResult<Vec<_>>>()?;
            BlockBody::Full { txs }
        } else {
            BlockBody::Hashes {
                tx_hashes: block.tx_hashes(),
            }
        };
        Ok(BlockInfo {
            header: HeaderInfo::from(&block.header),
            body,
        })
    }

    fn chain_get_header(&self, block: BlockId) -> RpcResult<HeaderInfo> {
        Ok(HeaderInfo::from(&self.block(block)?.header))
    }

    fn chain_get_transaction(&self, hash: Hash) -> RpcResult<TxDetail> {
        let c = &self.chain;
        if let Some(tx) = c.mempool().get(&hash) {
            return Ok(TxDetail {
                tx: TxInfo::from(tx),
                status: TxStatus::Pending,
                receipt: None,
            });
        }
        let earliest = c.prune_status().earliest();
        let not_found = || {
            let kept = if earliest > 0 {
                format!(" (this node keeps blocks from height {earliest})")
            } else {
                String::new()
            };
            err(
                codes::NOT_FOUND,
                format!("transaction {hash} not found{kept}"),
            )
        };
        let location = c
            .blocks
            .tx_location(&hash)
            .map_err(internal)?
            .ok_or_else(not_found)?;
        self.check_retained(location.height)?;
        let (bytes, receipt) = c
            .blocks
            .transaction(&hash)
            .map_err(|e| self.read_error(location.height, e))?
            .ok_or_else(not_found)?;
        let tx = Transaction::decode(&bytes).map_err(internal)?;
        Ok(TxDetail {
            tx: TxInfo::from(&tx),
            status: c.tx_status(&hash).map_err(internal)?,
            receipt: Some(ReceiptInfo::from(&receipt)),
        })
    }

    fn state_get_account(
        &self,
        address: Address,
        height: Option<Height>,
    ) -> RpcResult<AccountInfo> {
        let c = &self.chain;
        let height = self.state_height(height)?;
        let account = c
            .state
            .account(&address, height)
            .map_err(|e| self.state_error(height, e))?
            .unwrap_or_default();
        let mut info = AccountInfo::new(address, &account, height);
        if height == c.tip().finalized.0 {
            // The nonce a wallet should use next, counting this sender's pending transactions.
            let next = c
                .mempool()
                .pending_nonce(&address)
                .unwrap_or(account.nonce)
                .max(account.nonce);
            info.next_nonce = Some(next);
        }
        Ok(info)
    }

    fn state_get_proof(&self, address: Address, height: Option<Height>) -> RpcResult<AccountProof> {
        let height = self.state_height(height)?;
        let (account, proof, root) = self
            .chain
            .state
            .account_with_proof(&address, height)
            .map_err(|e| self.state_error(height, e))?;
        let header = self
            .chain
            .blocks
            .header_at(height)
            .map_err(|e| self.read_error(height, e))?
            .ok_or_else(|| self.read_error(height, format!("no header at height {height}")))?;
        let finality = match height {
            0 => None,
            h => Some(crate::light::finality_proof(&self.chain, h).map_err(proof_error)?),
        };
        Ok(AccountProof {
            state_root: root,
            height,
            address,
            key: account_key(&address),
            value: account.as_ref().map(|acc| HexBytes(acc.encode())),
            account: account
                .as_ref()
                .map(|acc| AccountInfo::new(address, acc, height)),
            proof,
            epoch: self.chain.epoch_of_height(height),
            header: HexBytes(header.encode()),
            finality,
        })
    }

    fn chain_get_finality_proof(&self, height: Height) -> RpcResult<crate::light::FinalityProof> {
        crate::light::finality_proof(&self.chain, height.0).map_err(proof_error)
    }

    fn chain_get_epoch_change(&self, epoch: u64) -> RpcResult<crate::light::EpochChange> {
        crate::light::epoch_change(&self.chain, epoch).map_err(proof_error)
    }

    fn state_get_validators(&self, height: Option<Height>) -> RpcResult<Vec<ValidatorInfo>> {
        let c = &self.chain;
        // The set that signs the block at `height`; without a height, the current epoch's.
        let epoch = match height {
            Some(h) => c.epoch_of_height(self.state_height(Some(h))?),
            None => c.epoch(),
        };
        let set = c.validator_set(epoch).map_err(|e| {
            err(
                codes::INTERNAL,
                format!("validator set of epoch {epoch}: {e}"),
            )
        })?;
        let total = set.total_stake().max(1);
        Ok(set
            .validators()
            .iter()
            .map(|v| ValidatorInfo::new(v, total))
            .collect())
    }

    async fn tx_submit(&self, tx: SignedTxHex) -> RpcResult<Hash> {
        let digits = tx.digits();
        if digits.len() > 2 * crate::mempool::MAX_TX_BYTES {
            return Err(err(
                codes::TX_TOO_LARGE,
                format!("transaction exceeds {} bytes", crate::mempool::MAX_TX_BYTES),
            ));
        }
        let bytes = hex::decode(digits).map_err(|e| invalid("tx", format!("invalid hex: {e}")))?;
        self.submissions
            .submit(bytes)
            .await
            .map_err(|_| internal("transaction admission stopped before answering"))?
            .map_err(submit_error)
    }

    fn tx_status(&self, hash: Hash) -> RpcResult<TxStatus> {
        self.chain.tx_status(&hash).map_err(internal)
    }

    async fn chain_subscribe_new_heads(
        &self,
        pending: PendingSubscriptionSink,
    ) -> SubscriptionResult {
        self.stream_heads(pending, NodeContext::subscribe_new_heads)
            .await
    }

    async fn chain_subscribe_finalized_heads(
        &self,
        pending: PendingSubscriptionSink,
    ) -> SubscriptionResult {
        self.stream_heads(pending, NodeContext::subscribe_finalized_heads)
            .await
    }
}
