//! ed25519 keys and signatures, with one verification rule for single and batch checks.
//!
//! Validity is the **cofactored** ed25519 equation (as in ZIP-215): a signature `(R, s)` by
//! key `A` over `M` is valid iff `s` is canonical (`s < l`), `R` decompresses, and
//! `[8]([s]B - R - [k]A)` is the identity, with `k = SHA-512(R || A || M) mod l` over the
//! bytes exactly as given. Batch verification checks a random linear combination of the same
//! equations, also multiplied by the cofactor, so a batch passes exactly when every member
//! passes alone (up to a 2^-128 chance); the verdict on a signature never depends on whether
//! or with what it was batched. Keys of small order ("weak" keys, for which anyone could
//! forge under the cofactored rule) are refused when a [`PublicKey`] is parsed.
//!
//! Signing is standard ed25519 (ed25519-dalek): honest signatures are valid under every
//! common ed25519 rule; only deliberately crafted ones with torsion components in `R` are
//! judged differently from `verify_strict`, and this module judges them the same everywhere.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, OnceLock, PoisonError};

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha512};

use crate::{Address, Error, Hash, Result};

/// Key-derivation context of the batch coefficients (blake3 `derive_key` mode).
const BATCH_COEFFICIENTS_CONTEXT: &str = "keel 2026 ed25519 cofactored batch coefficients v1";

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

    /// The public half. Never a weak key: the clamped secret scalar is a multiple of 8 in
    /// `[2^254, 2^255)`, never a multiple of the group order `l`, so `A` has order `l`.
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

/// A validated ed25519 public key: a point on the curve that is not of small order.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses 32 bytes, refusing encodings that are not curve points and weak keys (points of
    /// small order, including the identity): under the cofactored rule anyone could sign for
    /// those. Encodings are otherwise taken as ZIP-215 does; the bytes are kept as given and
    /// are what signatures hash.
    ///
    /// Decompressing a point costs about as much as a third of a signature check, and the
    /// same senders' keys are parsed again and again (each transaction at admission, in
    /// gossip and in blocks), so keys that parsed recently are found in a small process-wide
    /// cache ([`KEY_CACHE_SLOTS`] slots) instead. Only keys that passed are cached, under
    /// their exact bytes: the verdict on any input is the same with or without the cache.
    pub fn from_bytes(bytes: &[u8]) -> Result<PublicKey> {
        let arr: [u8; 32] = crate::codec::array("public_key", bytes)?;
        let slot = key_cache().slot(&arr);
        if let Some((cached, key)) = *slot.lock().unwrap_or_else(PoisonError::into_inner) {
            if cached == arr {
                return Ok(PublicKey(key));
            }
        }
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| Error::PublicKey)?;
        if key.is_weak() {
            return Err(Error::PublicKey);
        }
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some((arr, key));
        Ok(PublicKey(key))
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

    /// Verifies one signature over a message hash with the cofactored equation
    /// `[8]([s]B - R - [k]A) == identity`, `k = SHA-512(R || A || msg) mod l`; `s` must be
    /// canonical (`s < l`) and `R` must decompress. Exactly the signatures [`verify_batch`]
    /// accepts.
    pub fn verify(&self, msg: &Hash, sig: &Signature) -> Result<()> {
        let parts = SignatureParts::parse(self, msg, sig).ok_or(Error::BadSignature)?;
        let minus_a = -self.0.to_edwards();
        // [k](-A) + [s]B
        let expected_r =
            EdwardsPoint::vartime_double_scalar_mul_basepoint(&parts.k, &minus_a, &parts.s);
        if (expected_r - parts.r).mul_by_cofactor().is_identity() {
            Ok(())
        } else {
            Err(Error::BadSignature)
        }
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

/// Slots of the cache of parsed public keys (one key each, direct-mapped).
pub const KEY_CACHE_SLOTS: usize = 4096;

/// Bytes the cache of parsed public keys takes once in use (allocated on the first parse,
/// never grown): what [`key_cache_bytes`] reports.
pub const KEY_CACHE_BYTES: u64 = (KEY_CACHE_SLOTS * std::mem::size_of::<KeySlot>()) as u64;

/// One slot: the key's bytes and the key parsed from them.
type KeySlot = Mutex<Option<([u8; 32], VerifyingKey)>>;

/// Recently parsed public keys, direct-mapped by a hash of their bytes that is keyed per
/// process (so nobody can choose keys that keep evicting one another on every node). A
/// collision only evicts; each slot has a lock of its own, so parallel parsers rarely wait.
struct KeyCache {
    slots: Box<[KeySlot]>,
    hasher: RandomState,
}

impl KeyCache {
    fn slot(&self, bytes: &[u8; 32]) -> &KeySlot {
        let i = self.hasher.hash_one(bytes) as usize % self.slots.len();
        &self.slots[i]
    }
}

static KEYS: OnceLock<KeyCache> = OnceLock::new();

fn key_cache() -> &'static KeyCache {
    KEYS.get_or_init(|| KeyCache {
        slots: (0..KEY_CACHE_SLOTS).map(|_| Mutex::new(None)).collect(),
        hasher: RandomState::new(),
    })
}

/// Bytes held by the cache of parsed public keys: [`KEY_CACHE_BYTES`] once any key has been
/// parsed in this process, else 0.
pub fn key_cache_bytes() -> u64 {
    if KEYS.get().is_some() {
        KEY_CACHE_BYTES
    } else {
        0
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

    /// The 32 bytes of `R` and the 32 bytes of `s`.
    fn split(&self) -> ([u8; 32], [u8; 32]) {
        let sig = ed25519_dalek::Signature::from_bytes(&self.0);
        (*sig.r_bytes(), *sig.s_bytes())
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature(0x{}..)", hex::encode(&self.0[..8]))
    }
}

/// What the verification equation uses of one signature.
struct SignatureParts {
    /// `R`, decompressed.
    r: EdwardsPoint,
    /// `s`, canonical.
    s: Scalar,
    /// The challenge `k = SHA-512(R || A || msg) mod l`.
    k: Scalar,
}

impl SignatureParts {
    /// `None` when `s` is not canonical or `R` is not a curve point: such a signature is
    /// invalid alone and in any batch.
    fn parse(key: &PublicKey, msg: &Hash, sig: &Signature) -> Option<SignatureParts> {
        let (r_bytes, s_bytes) = sig.split();
        let s = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes))?;
        let r = CompressedEdwardsY(r_bytes).decompress()?;
        Some(SignatureParts {
            r,
            s,
            k: challenge(&r_bytes, key.0.as_bytes(), msg),
        })
    }
}

/// `SHA-512(R || A || msg) mod l` over the bytes as given, as ed25519 signers compute it.
fn challenge(r: &[u8; 32], a: &[u8; 32], msg: &Hash) -> Scalar {
    let digest = Sha512::new()
        .chain_update(r)
        .chain_update(a)
        .chain_update(msg.as_bytes())
        .finalize();
    let mut wide = [0u8; 64];
    wide.copy_from_slice(&digest);
    Scalar::from_bytes_mod_order_wide(&wide)
}

/// The 128-bit coefficients `z_i` of a batch: blake3 (keyed by a context string) of the
/// length and every `(R, A, msg, s)`, read from the XOF 16 bytes at a time. Deterministic, so
/// a batch's verdict is reproducible; they cannot be predicted before every input is fixed,
/// which is all soundness needs (a forger would have to find inputs whose own hash cancels
/// their errors, a 2^-128 chance per try).
fn batch_coefficients(msgs: &[Hash], sigs: &[Signature], keys: &[PublicKey]) -> Vec<Scalar> {
    let mut hasher = blake3::Hasher::new_derive_key(BATCH_COEFFICIENTS_CONTEXT);
    hasher.update(&(sigs.len() as u64).to_le_bytes());
    for ((msg, sig), key) in msgs.iter().zip(sigs).zip(keys) {
        let (r, s) = sig.split();
        hasher.update(&r);
        hasher.update(key.0.as_bytes());
        hasher.update(msg.as_bytes());
        hasher.update(&s);
    }
    let mut xof = hasher.finalize_xof();
    (0..sigs.len())
        .map(|_| {
            let mut z = [0u8; 16];
            xof.fill(&mut z);
            Scalar::from(u128::from_le_bytes(z))
        })
        .collect()
}

/// Verifies many signatures at once: succeeds exactly when every one passes
/// [`PublicKey::verify`] alone (up to a 2^-128 chance), whatever else is in the batch.
///
/// Checks `[8](-(Σ z_i s_i) B + Σ z_i R_i + Σ (z_i k_i) A_i) == identity` in one multiscalar
/// multiplication, with 128-bit `z_i` derived from the whole batch (see
/// `batch_coefficients`). Because of the factor 8, a torsion component in some `R_i` cannot
/// make the verdict depend on `z_i`. Fails (without saying which) if any `s_i` is not
/// canonical, any `R_i` does not decompress, or the slices differ in length; the caller then
/// verifies one by one to find the culprit. An empty batch passes.
pub fn verify_batch(msgs: &[Hash], sigs: &[Signature], keys: &[PublicKey]) -> Result<()> {
    if msgs.len() != sigs.len() || msgs.len() != keys.len() {
        return Err(Error::BadSignature);
    }
    let parts = keys
        .iter()
        .zip(msgs)
        .zip(sigs)
        .map(|((key, msg), sig)| SignatureParts::parse(key, msg, sig))
        .collect::<Option<Vec<SignatureParts>>>()
        .ok_or(Error::BadSignature)?;
    let zs = batch_coefficients(msgs, sigs, keys);
    let b_coefficient: Scalar = parts.iter().zip(&zs).map(|(p, z)| z * p.s).sum();
    let scalars = std::iter::once(-b_coefficient)
        .chain(zs.iter().copied())
        .chain(parts.iter().zip(&zs).map(|(p, z)| z * p.k));
    let points = std::iter::once(ED25519_BASEPOINT_POINT)
        .chain(parts.iter().map(|p| p.r))
        .chain(keys.iter().map(|k| k.0.to_edwards()));
    if EdwardsPoint::vartime_multiscalar_mul(scalars, points)
        .mul_by_cofactor()
        .is_identity()
    {
        Ok(())
    } else {
        Err(Error::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use curve25519_dalek::constants::EIGHT_TORSION;
    use proptest::prelude::*;

    use super::*;

    fn keys(n: u64, offset: u64) -> Vec<Keypair> {
        (offset..offset + n).map(Keypair::from_seed).collect()
    }

    /// Honest messages, signatures and keys of `keys`, message `i` = blake3(`salt`, `i`).
    fn honest(keys: &[Keypair], salt: u64) -> (Vec<Hash>, Vec<Signature>, Vec<PublicKey>) {
        let msgs: Vec<Hash> = (0..keys.len() as u64)
            .map(|i| Hash::digest(&[salt.to_le_bytes(), i.to_le_bytes()].concat()))
            .collect();
        let sigs = keys.iter().zip(&msgs).map(|(k, m)| k.sign(m)).collect();
        let pubs = keys.iter().map(Keypair::public).collect();
        (msgs, sigs, pubs)
    }

    /// The secret scalar `a` of a key (`A = [a]B`): SHA-512 of the seed, first half, clamped.
    fn secret_scalar(key: &Keypair) -> Scalar {
        let digest = Sha512::digest(key.secret());
        let mut a = [0u8; 32];
        a.copy_from_slice(&digest[..32]);
        a[0] &= 248;
        a[31] &= 127;
        a[31] |= 64;
        Scalar::from_bytes_mod_order(a)
    }

    /// A signature by `key` over `msg` whose `R` is `[r]B + torsion`: valid under the
    /// cofactored equation (`[s]B - R - [k]A = -torsion`), refused by `verify_strict`.
    fn torsion_signature(
        key: &Keypair,
        msg: &Hash,
        nonce: u64,
        torsion: EdwardsPoint,
    ) -> Signature {
        let a = secret_scalar(key);
        let mut wide = [0u8; 64];
        wide.copy_from_slice(&Sha512::digest(nonce.to_le_bytes()));
        let r = Scalar::from_bytes_mod_order_wide(&wide);
        let big_r = (EdwardsPoint::mul_base(&r) + torsion).compress().to_bytes();
        let k = challenge(&big_r, key.public().0.as_bytes(), msg);
        let s = r + k * a;
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&big_r);
        sig[32..].copy_from_slice(s.as_bytes());
        Signature(sig)
    }

    fn dalek_strict(key: &PublicKey, msg: &Hash, sig: &Signature) -> bool {
        key.0
            .verify_strict(
                msg.as_bytes(),
                &ed25519_dalek::Signature::from_bytes(&sig.0),
            )
            .is_ok()
    }

    fn dalek_batch(msgs: &[Hash], sigs: &[Signature], keys: &[PublicKey]) -> bool {
        let m: Vec<&[u8]> = msgs.iter().map(|h| h.0.as_slice()).collect();
        let s: Vec<ed25519_dalek::Signature> = sigs
            .iter()
            .map(|s| ed25519_dalek::Signature::from_bytes(&s.0))
            .collect();
        let k: Vec<VerifyingKey> = keys.iter().map(|k| k.0).collect();
        ed25519_dalek::verify_batch(&m, &s, &k).is_ok()
    }

    /// `s + l` as 32 little-endian bytes (fits: `s < l < 2^253`).
    fn plus_group_order(s: [u8; 32]) -> [u8; 32] {
        // l - 1, plus the carry-in of 1.
        let l_minus_one = (-Scalar::ONE).to_bytes();
        let mut out = [0u8; 32];
        let mut carry = 1u16;
        for ((out, a), b) in out.iter_mut().zip(s).zip(l_minus_one) {
            let sum = u16::from(a) + u16::from(b) + carry;
            *out = sum as u8;
            carry = sum >> 8;
        }
        assert_eq!(carry, 0);
        out
    }

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
    fn a_cached_key_is_the_key_its_bytes_parse_to_and_refusals_are_never_cached() {
        let keys = keys(KEY_CACHE_SLOTS as u64 + 500, 7);
        for round in 0..2 {
            for k in &keys {
                let bytes = k.public().to_bytes();
                let parsed = PublicKey::from_bytes(&bytes).unwrap();
                assert_eq!(parsed.to_bytes(), bytes, "round {round}");
                assert_eq!(
                    parsed.0.to_edwards(),
                    k.public().0.to_edwards(),
                    "round {round}"
                );
            }
        }
        assert_eq!(key_cache_bytes(), KEY_CACHE_BYTES);
        // A weak key (the identity) and a non-point are refused every time.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut not_a_point = [0u8; 32];
        not_a_point[0] = 2;
        for _ in 0..3 {
            assert!(PublicKey::from_bytes(&identity).is_err());
            assert!(PublicKey::from_bytes(&not_a_point).is_err());
        }
    }

    #[test]
    fn address_is_blake3_prefix_of_public_key() {
        let k = Keypair::from_seed(1);
        let h = Hash::digest(&k.public().to_bytes());
        assert_eq!(&k.address().0[..], &h.0[..20]);
    }

    #[test]
    fn honest_signatures_pass_alone_and_in_batches_and_one_bad_one_fails_the_batch() {
        for n in [1usize, 2, 64] {
            let (msgs, mut sigs, pubs) = honest(&keys(n as u64, 100), n as u64);
            for i in 0..n {
                assert!(pubs[i].verify(&msgs[i], &sigs[i]).is_ok());
                assert!(dalek_strict(&pubs[i], &msgs[i], &sigs[i]));
            }
            assert!(verify_batch(&msgs, &sigs, &pubs).is_ok(), "batch of {n}");
            assert!(dalek_batch(&msgs, &sigs, &pubs));
            let bad = n / 2;
            sigs[bad].0[40] ^= 0x10;
            assert!(pubs[bad].verify(&msgs[bad], &sigs[bad]).is_err());
            assert_eq!(verify_batch(&msgs, &sigs, &pubs), Err(Error::BadSignature));
            // A signature over another message, or by another key, fails too.
            sigs[bad].0[40] ^= 0x10;
            let other = Hash::digest(b"other");
            let mut wrong_msgs = msgs.clone();
            wrong_msgs[bad] = other;
            assert!(verify_batch(&wrong_msgs, &sigs, &pubs).is_err());
            let mut wrong_keys = pubs.clone();
            wrong_keys[bad] = Keypair::from_seed(999).public();
            assert!(verify_batch(&msgs, &sigs, &wrong_keys).is_err());
        }
        assert!(verify_batch(&[], &[], &[]).is_ok());
        let (msgs, sigs, pubs) = honest(&keys(2, 0), 0);
        assert!(verify_batch(&msgs[..1], &sigs, &pubs).is_err());
        assert!(verify_batch(&msgs, &sigs, &pubs[..1]).is_err());
    }

    #[test]
    fn a_torsion_signature_is_accepted_alone_and_in_every_batch() {
        let signer = Keypair::from_seed(7);
        let msg = Hash::digest(b"crafted");
        // Every torsion point but the identity: orders 8, 4, 8, 2, 8, 4, 8.
        for (t, torsion) in EIGHT_TORSION.iter().enumerate().skip(1) {
            let sig = torsion_signature(&signer, &msg, t as u64, *torsion);
            let key = signer.public();
            assert!(key.verify(&msg, &sig).is_ok(), "torsion {t} alone");
            assert!(!dalek_strict(&key, &msg, &sig), "verify_strict refuses it");
            assert!(verify_batch(&[msg], &[sig], &[key]).is_ok());
            // With 0..=70 honest companions, the crafted one at a varying position.
            for companions in 0..=70usize {
                let (mut msgs, mut sigs, mut pubs) = honest(
                    &keys(companions as u64, 1_000),
                    (t * 100 + companions) as u64,
                );
                let at = (companions * 7 + t) % (companions + 1);
                msgs.insert(at, msg);
                sigs.insert(at, sig);
                pubs.insert(at, key);
                assert!(
                    verify_batch(&msgs, &sigs, &pubs).is_ok(),
                    "torsion {t}, {companions} companions, position {at}"
                );
            }
        }
        // Every position of a batch of 71.
        let sig = torsion_signature(&signer, &msg, 99, EIGHT_TORSION[4]);
        let (msgs, sigs, pubs) = honest(&keys(70, 2_000), 5);
        for at in 0..=70 {
            let (mut m, mut s, mut p) = (msgs.clone(), sigs.clone(), pubs.clone());
            m.insert(at, msg);
            s.insert(at, sig);
            p.insert(at, signer.public());
            assert!(verify_batch(&m, &s, &p).is_ok(), "position {at}");
        }
    }

    #[test]
    fn dalek_batch_verification_judges_a_torsion_signature_by_its_companions() {
        // The inconsistency the cofactored rule removes: ed25519-dalek's cofactorless batch
        // equation accepts R = [r]B + T (T of order 2) exactly when its coefficient is even.
        let signer = Keypair::from_seed(8);
        let msg = Hash::digest(b"crafted");
        let sig = torsion_signature(&signer, &msg, 1, EIGHT_TORSION[4]);
        let key = signer.public();
        assert!(!dalek_strict(&key, &msg, &sig));
        let (mut accepted, mut refused) = (0, 0);
        for set in 0..40u64 {
            let (mut msgs, mut sigs, mut pubs) = honest(&keys(3, 10 * set), set);
            msgs.push(msg);
            sigs.push(sig);
            pubs.push(key);
            if dalek_batch(&msgs, &sigs, &pubs) {
                accepted += 1;
            } else {
                refused += 1;
            }
            assert!(verify_batch(&msgs, &sigs, &pubs).is_ok(), "set {set}");
        }
        assert!(
            accepted > 0 && refused > 0,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn weak_public_keys_are_refused() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(PublicKey::from_bytes(&identity), Err(Error::PublicKey));
        for (i, t) in EIGHT_TORSION.iter().enumerate() {
            assert_eq!(
                PublicKey::from_bytes(t.compress().as_bytes()),
                Err(Error::PublicKey),
                "torsion point {i}"
            );
        }
        // A key with a torsion component but of large order is a curve point like any other.
        let a = Keypair::from_seed(3).public().0.to_edwards();
        let mixed = (a + EIGHT_TORSION[1]).compress();
        assert!(PublicKey::from_bytes(mixed.as_bytes()).is_ok());
        for seed in 0..64 {
            let key = Keypair::from_seed(seed).public();
            assert_eq!(PublicKey::from_bytes(&key.to_bytes()), Ok(key));
        }
    }

    #[test]
    fn a_non_canonical_s_is_refused_alone_and_in_a_batch() {
        let (msgs, mut sigs, pubs) = honest(&keys(8, 300), 3);
        let mut s = [0u8; 32];
        s.copy_from_slice(&sigs[5].0[32..]);
        let s_plus_l = plus_group_order(s);
        sigs[5].0[32..].copy_from_slice(&s_plus_l);
        // The same equation holds for s + l; only the encoding check refuses it.
        assert_eq!(pubs[5].verify(&msgs[5], &sigs[5]), Err(Error::BadSignature));
        assert!(!dalek_strict(&pubs[5], &msgs[5], &sigs[5]));
        assert_eq!(verify_batch(&msgs, &sigs, &pubs), Err(Error::BadSignature));
        assert_eq!(
            verify_batch(&msgs[5..6], &sigs[5..6], &pubs[5..6]),
            Err(Error::BadSignature)
        );
    }

    /// One signature of a property-test batch.
    #[derive(Clone, Debug)]
    enum Kind {
        Valid,
        FlipR(u8),
        FlipS(u8),
        FlipMsg(u8),
        Torsion(usize),
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            3 => Just(Kind::Valid),
            1 => (0u8..=255).prop_map(Kind::FlipR),
            1 => (0u8..=255).prop_map(Kind::FlipS),
            1 => (0u8..=255).prop_map(Kind::FlipMsg),
            2 => (1usize..8).prop_map(Kind::Torsion),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn a_batch_passes_exactly_when_each_signature_passes_alone(
            kinds in proptest::collection::vec((kind(), any::<u64>()), 1..24),
        ) {
            let mut msgs = Vec::new();
            let mut sigs = Vec::new();
            let mut pubs = Vec::new();
            for (i, (kind, seed)) in kinds.iter().enumerate() {
                let key = Keypair::from_seed(seed % 1_000);
                let mut msg = Hash::digest(&[seed.to_le_bytes(), (i as u64).to_le_bytes()].concat());
                let mut sig = key.sign(&msg);
                match *kind {
                    Kind::Valid => {}
                    Kind::FlipR(bit) => sig.0[usize::from(bit / 8)] ^= 1 << (bit % 8),
                    Kind::FlipS(bit) => sig.0[32 + usize::from(bit / 8)] ^= 1 << (bit % 8),
                    Kind::FlipMsg(bit) => msg.0[usize::from(bit / 8)] ^= 1 << (bit % 8),
                    Kind::Torsion(t) => sig = torsion_signature(&key, &msg, *seed, EIGHT_TORSION[t]),
                }
                msgs.push(msg);
                sigs.push(sig);
                pubs.push(key.public());
            }
            let alone = (0..sigs.len()).all(|i| pubs[i].verify(&msgs[i], &sigs[i]).is_ok());
            let expect_valid = kinds.iter().all(|(k, _)| matches!(k, Kind::Valid | Kind::Torsion(_)));
            prop_assert_eq!(alone, expect_valid);
            prop_assert_eq!(verify_batch(&msgs, &sigs, &pubs).is_ok(), alone);
        }
    }
}
