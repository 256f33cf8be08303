//! Transactions: the signed wire form and the checked form the node works with.

use prost::Message;

use crate::{codec, proto, Address, Error, Hash, Keypair, PublicKey, Result, Signature};

/// Domain separator of transaction signatures, so a transaction signature can never be
/// replayed as a vote signature or on another chain.
const TX_DOMAIN: &str = "keel 2026-11 transaction signing v1";

/// What a transaction does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxKind {
    /// Move `amount` from the sender to `to`.
    Transfer {
        /// Recipient.
        to: Address,
        /// Amount moved.
        amount: u64,
    },
    /// Lock `amount` of the sender's balance as stake.
    Bond {
        /// Amount bonded.
        amount: u64,
    },
    /// Start returning `amount` of stake to the balance.
    Unbond {
        /// Amount unbonded.
        amount: u64,
    },
}

/// The hash a sender signs: blake3 keyed by the domain, over the chain id and the body bytes.
pub fn signing_hash(chain_id: &str, body: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new_derive_key(TX_DOMAIN);
    h.update(&(chain_id.len() as u64).to_le_bytes());
    h.update(chain_id.as_bytes());
    h.update(body);
    Hash(*h.finalize().as_bytes())
}

/// A decoded transaction whose form has been checked (but whose signature may not have been
/// verified yet: see [`Transaction::verify_signature`]; batch verification lives elsewhere).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// blake3 of the `SignedTx` bytes.
    pub hash: Hash,
    /// Address of `public_key`.
    pub sender: Address,
    /// The sender's key.
    pub public_key: PublicKey,
    /// The signature over [`Transaction::signing_hash`].
    pub signature: Signature,
    /// Chain the transaction is for.
    pub chain_id: String,
    /// Sender's nonce.
    pub nonce: u64,
    /// Fee paid to the block proposer.
    pub fee: u64,
    /// What it does.
    pub kind: TxKind,
    /// Domain-separated hash of chain id and body: the signed message.
    pub signing_hash: Hash,
    /// The exact `SignedTx` bytes.
    pub bytes: Vec<u8>,
}

impl Transaction {
    /// Builds and signs a transaction.
    pub fn sign(key: &Keypair, chain_id: &str, nonce: u64, fee: u64, kind: TxKind) -> Transaction {
        let kind_proto = match kind {
            TxKind::Transfer { to, amount } => proto::tx::Kind::Transfer(proto::Transfer {
                to: to.0.to_vec(),
                amount,
            }),
            TxKind::Bond { amount } => proto::tx::Kind::Bond(proto::Bond { amount }),
            TxKind::Unbond { amount } => proto::tx::Kind::Unbond(proto::Unbond { amount }),
        };
        let body = proto::Tx {
            chain_id: chain_id.to_string(),
            nonce,
            fee,
            kind: Some(kind_proto),
        }
        .encode_to_vec();
        let signing_hash = signing_hash(chain_id, &body);
        let signature = key.sign(&signing_hash);
        let public_key = key.public();
        let bytes = proto::SignedTx {
            body,
            public_key: public_key.to_bytes().to_vec(),
            signature: signature.0.to_vec(),
        }
        .encode_to_vec();
        Transaction {
            hash: Hash::digest(&bytes),
            sender: public_key.address(),
            public_key,
            signature,
            chain_id: chain_id.to_string(),
            nonce,
            fee,
            kind,
            signing_hash,
            bytes,
        }
    }

    /// Decodes `SignedTx` bytes and checks their form. Does not verify the signature.
    pub fn decode(bytes: &[u8]) -> Result<Transaction> {
        let signed: proto::SignedTx = codec::decode("SignedTx", bytes)?;
        let public_key = PublicKey::from_bytes(&signed.public_key)?;
        let signature = Signature::from_slice(&signed.signature)?;
        let body: proto::Tx = codec::decode("Tx", &signed.body)?;
        let kind = match body.kind.ok_or(Error::Missing("tx.kind"))? {
            proto::tx::Kind::Transfer(t) => TxKind::Transfer {
                to: Address::from_slice("transfer.to", &t.to)?,
                amount: t.amount,
            },
            proto::tx::Kind::Bond(b) => TxKind::Bond { amount: b.amount },
            proto::tx::Kind::Unbond(u) => TxKind::Unbond { amount: u.amount },
        };
        Ok(Transaction {
            hash: Hash::digest(bytes),
            sender: public_key.address(),
            public_key,
            signature,
            signing_hash: signing_hash(&body.chain_id, &signed.body),
            chain_id: body.chain_id,
            nonce: body.nonce,
            fee: body.fee,
            kind,
            bytes: bytes.to_vec(),
        })
    }

    /// Verifies this transaction's signature on its own with the cofactored rule of
    /// [`PublicKey::verify`] (use batch verification for many: same verdicts).
    pub fn verify_signature(&self) -> Result<()> {
        self.public_key.verify(&self.signing_hash, &self.signature)
    }

    /// Every account this transaction may write: the sender, and a transfer's recipient.
    pub fn touched(&self) -> (Address, Option<Address>) {
        match self.kind {
            TxKind::Transfer { to, .. } => (self.sender, Some(to)),
            TxKind::Bond { .. } | TxKind::Unbond { .. } => (self.sender, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = TxKind> {
        prop_oneof![
            (any::<[u8; 20]>(), any::<u64>()).prop_map(|(to, amount)| TxKind::Transfer {
                to: Address(to),
                amount
            }),
            any::<u64>().prop_map(|amount| TxKind::Bond { amount }),
            any::<u64>().prop_map(|amount| TxKind::Unbond { amount }),
        ]
    }

    proptest! {
        #[test]
        fn signed_tx_round_trips(seed in any::<u64>(), chain in "[a-z0-9-]{0,20}",
                                 nonce in any::<u64>(), fee in any::<u64>(), kind in kind_strategy()) {
            let key = Keypair::from_seed(seed);
            let tx = Transaction::sign(&key, &chain, nonce, fee, kind);
            let back = Transaction::decode(&tx.bytes).unwrap();
            prop_assert_eq!(&back, &tx);
            prop_assert!(back.verify_signature().is_ok());
            prop_assert_eq!(back.sender, key.address());
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Transaction::decode(&bytes);
        }
    }

    #[test]
    fn tampered_body_fails_signature() {
        let key = Keypair::from_seed(9);
        let tx = Transaction::sign(&key, "c", 0, 1, TxKind::Bond { amount: 5 });
        let mut signed = proto::SignedTx::decode(tx.bytes.as_slice()).unwrap();
        let mut body = proto::Tx::decode(signed.body.as_slice()).unwrap();
        body.fee = 2;
        signed.body = body.encode_to_vec();
        let bad = Transaction::decode(&signed.encode_to_vec()).unwrap();
        assert_eq!(bad.verify_signature(), Err(Error::BadSignature));
    }

    #[test]
    fn signature_is_bound_to_chain_id() {
        let key = Keypair::from_seed(3);
        let tx = Transaction::sign(&key, "a", 0, 1, TxKind::Bond { amount: 5 });
        let mut signed = proto::SignedTx::decode(tx.bytes.as_slice()).unwrap();
        let mut body = proto::Tx::decode(signed.body.as_slice()).unwrap();
        body.chain_id = "b".into();
        signed.body = body.encode_to_vec();
        let other = Transaction::decode(&signed.encode_to_vec()).unwrap();
        assert!(other.verify_signature().is_err());
    }

    #[test]
    fn missing_kind_and_short_recipient_are_refused() {
        let key = Keypair::from_seed(4);
        let body = proto::Tx {
            chain_id: "c".into(),
            nonce: 0,
            fee: 1,
            kind: None,
        }
        .encode_to_vec();
        let sig = key.sign(&signing_hash("c", &body));
        let bytes = proto::SignedTx {
            body,
            public_key: key.public().to_bytes().to_vec(),
            signature: sig.0.to_vec(),
        }
        .encode_to_vec();
        assert_eq!(Transaction::decode(&bytes), Err(Error::Missing("tx.kind")));

        let body = proto::Tx {
            chain_id: "c".into(),
            nonce: 0,
            fee: 1,
            kind: Some(proto::tx::Kind::Transfer(proto::Transfer {
                to: vec![1; 19],
                amount: 1,
            })),
        }
        .encode_to_vec();
        let bytes = proto::SignedTx {
            body,
            public_key: key.public().to_bytes().to_vec(),
            signature: sig.0.to_vec(),
        }
        .encode_to_vec();
        assert!(matches!(
            Transaction::decode(&bytes),
            Err(Error::Length {
                field: "transfer.to",
                ..
            })
        ));
    }
}
