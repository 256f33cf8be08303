//! `keel testnet`: N homes sharing one genesis, each validator's peers wired to the others.
//!
//! Node `i` listens for p2p on `base_port + 3i`, RPC on `127.0.0.1:base_port + 3i + 1` and
//! metrics on `127.0.0.1:base_port + 3i + 2`; every other node is a persistent peer
//! (`/ip4/127.0.0.1/tcp/<port>/p2p/<peer id>`). Every validator's own address is funded.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use keel_genesis::Genesis;
use keel_types::{Address, Keypair};

use crate::config::Config;
use crate::home::{write_key_file, Home};
use crate::net::libp2p::peer_id;
use crate::{Error, Result};

/// What to generate.
#[derive(Clone, Debug)]
pub struct TestnetSpec {
    /// Number of validators (at least 1).
    pub validators: u32,
    /// Output folder; `node0` ... are created in it.
    pub out: PathBuf,
    /// First port (see the module doc).
    pub base_port: u16,
    /// Block time of every node.
    pub block_time_ms: u64,
    /// Chain id.
    pub chain_id: String,
    /// Genesis time.
    pub genesis_time_ms: u64,
    /// Extra funded addresses.
    pub funded: Vec<Address>,
    /// Blocks per epoch (`None`: the genesis default).
    pub epoch_length: Option<u64>,
}

/// One generated node.
#[derive(Clone, Debug)]
pub struct TestnetNode {
    /// Its home.
    pub home: PathBuf,
    /// Its validator address.
    pub address: Address,
    /// Its RPC address.
    pub rpc: SocketAddr,
    /// Its p2p address, with its peer id.
    pub p2p: String,
}

fn port(base: u16, i: u32, offset: u32) -> Result<u16> {
    u16::try_from(u32::from(base) + 3 * i + offset).map_err(|_| {
        Error::Testnet(format!(
            "--base-port {base}: port of node {i} is above 65535"
        ))
    })
}

/// Writes the homes. Refuses an output folder that already holds a `node0`.
pub fn generate(spec: &TestnetSpec) -> Result<Vec<TestnetNode>> {
    if spec.validators == 0 {
        return Err(Error::Testnet("--validators must be at least 1".into()));
    }
    if spec.out.join("node0").exists() {
        return Err(Error::Testnet(format!(
            "{} already holds a testnet (node0 exists); choose an empty folder",
            spec.out.display()
        )));
    }
    let mut keys = Vec::new();
    for _ in 0..spec.validators {
        keys.push((Keypair::generate(), Keypair::generate()));
    }
    let mut nodes = Vec::new();
    for (i, (_, node_key)) in keys.iter().enumerate() {
        let i = i as u32;
        nodes.push(TestnetNode {
            home: spec.out.join(format!("node{i}")),
            address: keys[i as usize].0.address(),
            rpc: SocketAddr::from(([127, 0, 0, 1], port(spec.base_port, i, 1)?)),
            p2p: format!(
                "/ip4/127.0.0.1/tcp/{}/p2p/{}",
                port(spec.base_port, i, 0)?,
                peer_id(node_key)?
            ),
        });
    }
    let public: Vec<_> = keys.iter().map(|(v, _)| v.public()).collect();
    let mut genesis =
        Genesis::generate(&spec.chain_id, spec.genesis_time_ms, &public, &spec.funded);
    if let Some(l) = spec.epoch_length {
        genesis.params.epoch_length = l;
    }
    genesis.validate()?;
    for (i, node) in nodes.iter().enumerate() {
        let home = Home::new(&node.home);
        fs::create_dir_all(home.root()).map_err(|e| Error::io(home.root(), e))?;
        write_key_file(&home.validator_key(), &keys[i].0)?;
        write_key_file(&home.node_key(), &keys[i].1)?;
        fs::write(home.genesis(), genesis.to_json_pretty())
            .map_err(|e| Error::io(home.genesis(), e))?;
        let mut config = Config {
            moniker: format!("node{i}"),
            ..Config::default()
        };
        let i = i as u32;
        config.p2p.listen_addr = format!("/ip4/127.0.0.1/tcp/{}", port(spec.base_port, i, 0)?);
        config.p2p.persistent_peers = nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j as u32 != i)
            .map(|(_, n)| n.p2p.clone())
            .collect();
        config.rpc.listen_addr = node.rpc;
        config.metrics.listen_addr =
            SocketAddr::from(([127, 0, 0, 1], port(spec.base_port, i, 2)?));
        config.consensus.block_time_ms = spec.block_time_ms;
        // Two block times (at least a second): a dead leader costs one short round.
        config.consensus.timeout_ms = spec.block_time_ms.saturating_mul(2).max(1000);
        config.validate()?;
        fs::write(home.config(), config.to_toml_string())
            .map_err(|e| Error::io(home.config(), e))?;
    }
    Ok(nodes)
}

/// The homes of a testnet folder written by [`generate`], in order.
pub fn homes(out: &Path) -> Vec<PathBuf> {
    (0..)
        .map(|i| out.join(format!("node{i}")))
        .take_while(|p| p.join("config.toml").exists())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn homes_share_genesis_and_know_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TestnetSpec {
            validators: 3,
            out: dir.path().to_path_buf(),
            base_port: 40_000,
            block_time_ms: 500,
            chain_id: "tn".into(),
            genesis_time_ms: 1,
            funded: vec![],
            epoch_length: Some(7),
        };
        let nodes = generate(&spec).unwrap();
        assert_eq!(homes(dir.path()).len(), 3);
        let g0 = Home::new(&nodes[0].home).load_genesis().unwrap();
        assert_eq!(g0.validators.len(), 3);
        assert_eq!(g0.params.epoch_length, 7);
        for (i, n) in nodes.iter().enumerate() {
            let home = Home::new(&n.home);
            assert_eq!(home.load_genesis().unwrap(), g0);
            let c = Config::load(&home.config()).unwrap();
            assert_eq!(
                c.p2p.listen_addr,
                format!("/ip4/127.0.0.1/tcp/{}", 40_000 + 3 * i)
            );
            assert_eq!(c.rpc.listen_addr.port() as usize, 40_001 + 3 * i);
            assert_eq!(c.p2p.persistent_peers.len(), 2);
            assert!(!c.p2p.persistent_peers.contains(&n.p2p));
            assert!(g0.accounts.iter().any(|a| a.address == n.address));
        }
        assert!(generate(&spec).is_err(), "never overwrite a testnet");
    }
}
