//! The worked examples of docs/transactions.md are what this code computes: a client written
//! from the docs gets the same bytes. Each `name: value` line of a documented example is
//! recomputed here; any drift between the docs and the code fails.

#![allow(clippy::expect_used)]

use std::collections::BTreeMap;

use keel_types::{Hash, Keypair, Transaction, TxKind, Vote};

/// The `name: value` lines of the fenced block after `<!-- example: NAME -->`.
fn example(name: &str) -> BTreeMap<String, String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/transactions.md");
    let doc = std::fs::read_to_string(path).expect("docs/transactions.md is readable");
    let marker = format!("<!-- example: {name} -->");
    let start = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("docs/transactions.md has no {marker}"));
    let rest = &doc[start + marker.len()..];
    let open = rest.find("```").expect("a fenced block follows the marker");
    let body = &rest[open + 3..];
    let body = &body[body.find('\n').expect("fence line ends") + 1..];
    let close = body.find("```").expect("the fenced block is closed");
    let mut fields = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in body[..close].lines() {
        if let Some((k, v)) = line.split_once(':') {
            if !line.starts_with(' ') {
                let k = k.trim().to_string();
                fields.insert(k.clone(), v.trim().to_string());
                last = Some(k);
                continue;
            }
        }
        // A continuation line (long hex wrapped onto the next lines).
        if let Some(k) = &last {
            if let Some(v) = fields.get_mut(k) {
                v.push_str(line.trim());
            }
        }
    }
    fields
}

fn field<'a>(f: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    f.get(name)
        .unwrap_or_else(|| panic!("the example has no `{name}:` line"))
}

fn secret(hex_str: &str) -> [u8; 32] {
    hex::decode(hex_str)
        .expect("secret is hex")
        .try_into()
        .expect("secret is 32 bytes")
}

fn print(lines: &[(&str, String)]) {
    for (k, v) in lines {
        println!("{k}: {v}");
    }
}

#[test]
fn the_transfer_example_is_what_keel_computes() {
    let f = example("transfer");
    let key = Keypair::from_secret(secret(field(&f, "secret key")));
    let to = Keypair::from_secret(secret(field(&f, "recipient secret key"))).address();
    let chain_id = field(&f, "chain id");
    let nonce: u64 = field(&f, "nonce").parse().expect("nonce");
    let fee: u64 = field(&f, "fee").parse().expect("fee");
    let amount: u64 = field(&f, "amount").parse().expect("amount");
    let tx = Transaction::sign(&key, chain_id, nonce, fee, TxKind::Transfer { to, amount });
    let signed: keel_types::proto::SignedTx =
        prost::Message::decode(tx.bytes.as_slice()).expect("SignedTx decodes");
    let computed = [
        ("public key", hex::encode(key.public().to_bytes())),
        ("address", key.address().to_string()),
        ("recipient", to.to_string()),
        ("body", hex::encode(&signed.body)),
        ("signing hash", hex::encode(tx.signing_hash.as_bytes())),
        ("signature", hex::encode(tx.signature.0)),
        ("signed tx", hex::encode(&tx.bytes)),
        ("tx hash", tx.hash.to_string()),
    ];
    print(&computed);
    for (name, value) in &computed {
        assert_eq!(field(&f, name), value, "docs/transactions.md: `{name}`");
    }
    // And the node accepts what the docs build: the signature verifies.
    let decoded = Transaction::decode(&tx.bytes).expect("decodes");
    decoded.verify_signature().expect("signature verifies");
}

#[test]
fn the_vote_example_is_what_keel_computes() {
    let f = example("vote");
    let key = Keypair::from_secret(secret(field(&f, "secret key")));
    let chain_id = field(&f, "chain id");
    let block_hash = Hash::from_slice(
        "block hash",
        &hex::decode(field(&f, "block hash").trim_start_matches("0x")).expect("hex"),
    )
    .expect("32 bytes");
    let height: u64 = field(&f, "height").parse().expect("height");
    let round: u64 = field(&f, "round").parse().expect("round");
    let vote = Vote::sign(&key, chain_id, block_hash, height, round);
    let computed = [
        ("voter", vote.voter.to_string()),
        (
            "signing hash",
            hex::encode(Vote::signing_hash(chain_id, &block_hash, height, round).as_bytes()),
        ),
        ("signature", hex::encode(vote.signature.0)),
    ];
    print(&computed);
    for (name, value) in &computed {
        assert_eq!(field(&f, name), value, "docs/transactions.md: `{name}`");
    }
}
