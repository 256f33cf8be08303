//! The home folder layout, key files, and `keel init`.
//!
//! ```text
//! HOME/config.toml        operator configuration
//! HOME/genesis.json       the chain's genesis
//! HOME/keys/validator.key consensus and account key (hex of the 32-byte ed25519 secret)
//! HOME/keys/node.key      network identity key
//! HOME/data/              the database
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use keel_genesis::Genesis;
use keel_types::{Address, Keypair};

use crate::config::Config;
use crate::{Error, Result};

/// Paths inside a node's home folder.
#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// The home at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `config.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// `genesis.json`.
    pub fn genesis(&self) -> PathBuf {
        self.root.join("genesis.json")
    }

    /// `keys/validator.key`.
    pub fn validator_key(&self) -> PathBuf {
        self.root.join("keys").join("validator.key")
    }

    /// `keys/node.key`.
    pub fn node_key(&self) -> PathBuf {
        self.root.join("keys").join("node.key")
    }

    /// `data/`.
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Reads and validates `genesis.json`.
    pub fn load_genesis(&self) -> Result<Genesis> {
        let path = self.genesis();
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Genesis::from_json(&text)?)
    }
}

/// Writes a new key file (mode 0600). Refuses to overwrite an existing file.
pub fn write_key_file(path: &Path, key: &Keypair) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(|e| Error::io(path, e))?;
    writeln!(file, "0x{}", hex::encode(key.secret())).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

/// Reads a key file written by [`write_key_file`] (`0x` optional, surrounding space ignored).
pub fn read_key_file(path: &Path) -> Result<Keypair> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let digits = text.trim();
    let digits = digits.strip_prefix("0x").unwrap_or(digits);
    let mut secret = [0u8; 32];
    hex::decode_to_slice(digits, &mut secret).map_err(|_| Error::KeyFile {
        path: path.to_path_buf(),
        reason: "expected 64 hex digits of an ed25519 secret key".into(),
    })?;
    Ok(Keypair::from_secret(secret))
}

/// What `keel init` did.
#[derive(Debug)]
pub struct InitReport {
    /// The validator's address (funded in a genesis `init` wrote).
    pub address: Address,
    /// Whether `genesis.json` was written (false if one was already there).
    pub wrote_genesis: bool,
    /// Whether keys were generated (false if they existed).
    pub wrote_keys: bool,
}

/// Sets up a home: `config.toml` (unless present), keys (unless present) and a one-validator
/// `genesis.json` funding the validator (unless present).
pub fn init(root: &Path, moniker: &str, chain_id: &str, now_ms: u64) -> Result<InitReport> {
    let home = Home::new(root);
    fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    if !home.config().exists() {
        let config = Config {
            moniker: moniker.to_string(),
            ..Config::default()
        };
        fs::write(home.config(), config.to_toml_string())
            .map_err(|e| Error::io(home.config(), e))?;
    }
    let mut wrote_keys = false;
    let validator = if home.validator_key().exists() {
        read_key_file(&home.validator_key())?
    } else {
        let k = Keypair::generate();
        write_key_file(&home.validator_key(), &k)?;
        wrote_keys = true;
        k
    };
    if !home.node_key().exists() {
        write_key_file(&home.node_key(), &Keypair::generate())?;
        wrote_keys = true;
    }
    let wrote_genesis = !home.genesis().exists();
    if wrote_genesis {
        let genesis = Genesis::generate(chain_id, now_ms, &[validator.public()], &[]);
        fs::write(home.genesis(), genesis.to_json_pretty())
            .map_err(|e| Error::io(home.genesis(), e))?;
    }
    Ok(InitReport {
        address: validator.address(),
        wrote_genesis,
        wrote_keys,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn init_writes_a_usable_home_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = init(dir.path(), "n0", "keel-test", 1_000).unwrap();
        assert!(r.wrote_genesis && r.wrote_keys);
        let home = Home::new(dir.path());
        let key = read_key_file(&home.validator_key()).unwrap();
        assert_eq!(key.address(), r.address);
        let g = home.load_genesis().unwrap();
        assert_eq!(g.chain_id, "keel-test");
        assert!(g.accounts.iter().any(|a| a.address == r.address));
        Config::load(&home.config()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(home.validator_key())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = init(dir.path(), "n0", "other", 2_000).unwrap();
        assert!(!again.wrote_genesis && !again.wrote_keys);
        assert_eq!(again.address, r.address);
        assert!(
            write_key_file(&home.validator_key(), &Keypair::generate()).is_err(),
            "never overwrite a key"
        );
    }

    #[test]
    fn bad_key_file_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, "hello").unwrap();
        let e = read_key_file(&p).unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
    }
}
