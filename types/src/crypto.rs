//! ed25519 keys and signatures (ed25519-dalek), with batch verification.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::{Address, Error, Hash, Result};

/// An ed25519 signing key. Its `Debug` never prints the secret.
#[derive(Clone)]
pub struct Keypair(SigningKey);

impl Keypair {
    /// A fresh key from the operating system's RNG.
    pub fn generate() -> Keypair {
        Keypair(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// A key from its 32 secret bytes.
    pub fn from_secret(secret: [u8; 32]) -> Keypair {
        Keypair(SigningKey::from_bytes(&secret))
    }

    /// A deterministic key from a seed, for tests and simulations only.
    pub fn from_seed(seed: u64) -> Keypair {
        Keypair::from_secret(*Hash::digest(&seed.to_le_bytes()).as_bytes())
    }

    /// The 32 secret bytes.
    pub fn secret(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The account address of this key.
    pub fn address(&self) -> Address {
        self.public().address()
    }

    /// Signs a 32-byte message hash.
    pub fn sign(&self, msg: &Hash) -> Signature {
        Signature(self.0.sign(msg.as_bytes()).to_bytes())
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.address())
    }
}

/// A validated ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses 32 bytes, refusing points that are not valid keys.
    pub fn from_bytes(bytes: &[u8]) -> Result<PublicKey> {
        let arr: [u8; 32] = crate::codec::array("public_key", bytes)?;
        VerifyingKey::from_bytes(&arr)
            .map(PublicKey)
            .map_err(|_| Error::PublicKey)
    }

    /// The 32 bytes of the key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The first 20 bytes of blake3(public key).
    pub fn address(&self) -> Address {
        let h = Hash::digest(self.0.as_bytes());
        let mut a = [0u8; 20];
        a.copy_from_slice(&h.0[..20]);
        Address(a)
    }

    /// Verifies one signature over a message hash (strict: rejects malleable signatures).
    pub fn verify(&self, msg: &Hash, sig: &Signature) -> Result<()> {
        let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
        self.0
            .verify_strict(msg.as_bytes(), &sig)
            .map_err(|_| Error::BadSignature)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A 64-byte ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl Signature {
    /// Parses a 64-byte field of a decoded message.
    pub fn from_slice(bytes: &[u8]) -> Result<Signature> {
        crate::codec::array("signature", bytes).map(Signature)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature(0x{}..)", hex::encode(&self.0[..8]))
    }
}

/// Verifies many signatures at once with ed25519 batch verification. Succeeds only if every
/// signature is valid; on failure the caller verifies one by one to find the culprit.
pub fn verify_batch(msgs: &[Hash], sigs: &[Signature], keys: &[PublicKey]) -> Result<()> {
    if msgs.len() != sigs.len() || msgs.len() != keys.len() {
        return Err(Error::BadSignature);
    }
    let m: Vec<&[u8]> = msgs.iter().map(|h| h.0.as_slice()).collect();
    let s: Vec<ed25519_dalek::Signature> = sigs
        .iter()
        .map(|s| ed25519_dalek::Signature::from_bytes(&s.0))
        .collect();
    let k: Vec<VerifyingKey> = keys.iter().map(|k| k.0).collect();
    ed25519_dalek::verify_batch(&m, &s, &k).map_err(|_| Error::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_batch_detect_a_bad_signature() {
        let keys: Vec<Keypair> = (0..8).map(Keypair::from_seed).collect();
        let msgs: Vec<Hash> = (0..8u8).map(|i| Hash::digest(&[i])).collect();
        let mut sigs: Vec<Signature> = keys.iter().zip(&msgs).map(|(k, m)| k.sign(m)).collect();
        let pubs: Vec<PublicKey> = keys.iter().map(Keypair::public).collect();
        assert!(pubs[0].verify(&msgs[0], &sigs[0]).is_ok());
        assert!(verify_batch(&msgs, &sigs, &pubs).is_ok());
        sigs[3].0[0] ^= 1;
        assert_eq!(verify_batch(&msgs, &sigs, &pubs), Err(Error::BadSignature));
        assert_eq!(pubs[3].verify(&msgs[3], &sigs[3]), Err(Error::BadSignature));
    }

    #[test]
    fn address_is_blake3_prefix_of_public_key() {
        let k = Keypair::from_seed(1);
        let h = Hash::digest(&k.public().to_bytes());
        assert_eq!(&k.address().0[..], &h.0[..20]);
    }
}
