//! The prost wire messages, generated at build time from `proto/keel/v1/keel.proto` (the
//! schema is the source of truth; see `build.rs`). Field numbers are part of the protocol:
//! never renumber.
//!
//! These are the raw encodings; the rest of keel works with the checked types of this crate
//! (`Transaction`, `Header`, `Block`, ...) that convert to and from them.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/keel.v1.rs"));

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prost::Message;

    use super::*;

    /// Pins the encodings to bytes worked out by hand from the proto3 rules (tag = field
    /// number << 3 | wire type; varints; length-delimited bytes and messages), so a changed
    /// field number or type in `keel.proto` fails here, not on a live chain.
    #[test]
    fn encodings_match_the_schema_byte_for_byte() {
        let tx = Tx {
            chain_id: "k".into(),
            nonce: 2,
            fee: 3,
            kind: Some(tx::Kind::Transfer(Transfer {
                to: vec![0xaa; 2],
                amount: 5,
            })),
        };
        // 1: "k"; 2: 2; 3: 3; 4: { 1: aa aa; 2: 5 }
        assert_eq!(
            hex::encode(tx.encode_to_vec()),
            "0a016b1002180322060a02aaaa1005"
        );
        let unbond = Tx {
            kind: Some(tx::Kind::Unbond(Unbond { amount: 1 })),
            ..Tx::default()
        };
        assert_eq!(hex::encode(unbond.encode_to_vec()), "32020801");
        let signed = SignedTx {
            body: vec![1],
            public_key: vec![2],
            signature: vec![3],
        };
        assert_eq!(hex::encode(signed.encode_to_vec()), "0a01011201021a0103");
        let header = Header {
            height: 1,
            round: 1 << 32,
            epoch: 1,
            failed_proposers: vec![vec![9]],
            parent_qc: Some(QuorumCertificate {
                height: 7,
                ..QuorumCertificate::default()
            }),
            ..Header::default()
        };
        // 2: 1; 3: 2^32 (varint 80 80 80 80 10); 10: { 2: 7 }; 11: 1; 13: 09
        assert_eq!(
            hex::encode(header.encode_to_vec()),
            "10011880808080105202100758016a0109"
        );
        let account = Account {
            balance: 1,
            nonce: 2,
            stake: 3,
            unbonding: vec![Unbonding {
                amount: 4,
                release_height: 5,
            }],
            jailed: true,
        };
        assert_eq!(
            hex::encode(account.encode_to_vec()),
            "0801100218032204080410052801"
        );
        let message = ConsensusMessage {
            kind: Some(consensus_message::Kind::Timeout(Timeout {
                round: 1,
                ..Timeout::default()
            })),
        };
        assert_eq!(hex::encode(message.encode_to_vec()), "1a021001");
        let batch = TxBatch {
            txs: vec![vec![1], vec![2, 3]],
        };
        // 1: 01; 1: 02 03 (a repeated bytes field: one tag per entry)
        assert_eq!(hex::encode(batch.encode_to_vec()), "0a01010a020203");
    }
}
