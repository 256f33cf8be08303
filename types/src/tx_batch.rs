//! Transactions gossiped together: a [`TxBatch`] carries what a node admitted over RPC in a
//! few milliseconds as one gossip message.

use prost::Message;

use crate::{codec, proto, Result};

/// Transactions gossiped as one message. Each entry is the exact bytes of one `SignedTx` and is
/// not checked here: receivers decode and verify every entry on its own, so a bad entry costs
/// only itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxBatch {
    /// The `SignedTx` bytes, in the order the sender admitted them.
    pub txs: Vec<Vec<u8>>,
}

impl TxBatch {
    /// Bytes an entry of `len` bytes adds to the encoding: its tag, its length prefix, itself.
    pub fn entry_len(len: usize) -> usize {
        1 + prost::length_delimiter_len(len) + len
    }

    /// Length of [`TxBatch::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        self.txs.iter().map(|t| TxBatch::entry_len(t.len())).sum()
    }

    /// Prost bytes.
    pub fn encode(&self) -> Vec<u8> {
        proto::TxBatch {
            txs: self.txs.clone(),
        }
        .encode_to_vec()
    }

    /// Decodes a batch (refusing more than [`crate::MAX_MESSAGE_BYTES`]); the entries are left
    /// as bytes.
    pub fn decode(bytes: &[u8]) -> Result<TxBatch> {
        let p: proto::TxBatch = codec::decode("TxBatch", bytes)?;
        Ok(TxBatch { txs: p.txs })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{Keypair, Transaction, TxKind};

    #[test]
    fn a_batch_round_trips_and_its_length_is_known_before_encoding() {
        let txs: Vec<Vec<u8>> = (0..300u64)
            .map(|n| {
                Transaction::sign(
                    &Keypair::from_seed(n % 7),
                    "k",
                    n,
                    1,
                    TxKind::Transfer {
                        to: crate::Address([1; 20]),
                        amount: n,
                    },
                )
                .bytes
            })
            // Entries of every length-prefix size: 0, 1 and 2 bytes of varint and more.
            .chain([Vec::new(), vec![7; 127], vec![7; 128], vec![7; 20_000]])
            .collect();
        let batch = TxBatch { txs };
        let bytes = batch.encode();
        assert_eq!(bytes.len(), batch.encoded_len());
        assert_eq!(TxBatch::decode(&bytes).unwrap(), batch);
        for (i, tx) in batch.txs.iter().enumerate().take(300) {
            assert_eq!(Transaction::decode(tx).unwrap().nonce, i as u64);
        }
        assert_eq!(TxBatch::decode(&[]).unwrap(), TxBatch::default());
    }

    #[test]
    fn bytes_that_are_not_a_batch_are_refused() {
        // Field 0 does not exist; a length prefix running past the end; a varint field 1.
        for bad in [&[0x01u8][..], &[0x0a, 0x05, 0x01], &[0x08, 0x01]] {
            assert!(TxBatch::decode(bad).is_err(), "{bad:?}");
        }
    }
}
