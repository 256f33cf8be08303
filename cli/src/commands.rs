//! Subcommand implementations.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use keel_genesis::Genesis;
use keel_node::config::Config;
use keel_node::home::{self, Home};
use keel_node::Node;
use keel_state::{verify_proof, Proof};
use keel_types::{Address, Hash, Transaction, TxKind};
use serde_json::{json, Value};

use crate::args::{
    Cli, Command, DevnetArgs, KeysCommand, QueryCommand, TestnetArgs, TxCommand, TxOptions,
};
use crate::client::Rpc;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting async runtime")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            home,
            moniker,
            chain_id,
        } => {
            let r = home::init(&home, &moniker, &chain_id, now_ms())?;
            println!("initialised {}", home.display());
            println!("validator address: {}", r.address);
            if r.wrote_genesis {
                println!("genesis.json: new chain {chain_id:?}, validator funded");
            } else {
                println!("genesis.json: kept the existing file");
            }
            Ok(())
        }
        Command::Keys(KeysCommand::Generate { out }) => {
            let key = keel_types::Keypair::generate();
            home::write_key_file(&out, &key)?;
            println!("{}", key.address());
            Ok(())
        }
        Command::Keys(KeysCommand::Show { home }) => {
            let key = home::read_key_file(&Home::new(&home).validator_key())?;
            println!("address:    {}", key.address());
            println!("public key: {}", key.public());
            Ok(())
        }
        Command::Start { home } => {
            let config = Config::load(&Home::new(&home).config())?;
            crate::logging::init(&config.log)?;
            runtime()?.block_on(run_node(&home, config))
        }
        Command::Devnet(args) => devnet(args),
        Command::Testnet(args) => testnet(args),
        Command::Status { rpc } => runtime()?.block_on(async {
            print_json(&Rpc::new(&rpc)?.call("chain_status", vec![]).await?);
            Ok(())
        }),
        Command::Query(q) => runtime()?.block_on(query(q)),
        Command::Tx(t) => runtime()?.block_on(tx(t)),
    }
}

async fn run_node(home: &Path, config: Config) -> Result<()> {
    let mut node = Node::start(home, config).await?;
    tokio::select! {
        r = shutdown_signal() => r?,
        r = node.failed() => {
            r?;
            bail!("consensus driver stopped unexpectedly");
        }
    }
    tracing::info!("shutting down");
    node.shutdown().await?;
    Ok(())
}

async fn shutdown_signal() -> Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
            _ = term.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
    }
}

fn testnet(args: TestnetArgs) -> Result<()> {
    let nodes = keel_node::testnet::generate(&keel_node::testnet::TestnetSpec {
        validators: args.validators,
        out: args.out.clone(),
        base_port: args.base_port,
        block_time_ms: args.block_time_ms,
        chain_id: args.chain_id.clone(),
        genesis_time_ms: now_ms(),
        funded: Vec::new(),
        epoch_length: args.epoch_length,
    })?;
    println!(
        "keel testnet: {} validators of chain {} in {}",
        nodes.len(),
        args.chain_id,
        args.out.display()
    );
    for n in &nodes {
        println!(
            "  {}  validator {}  rpc http://{}  p2p {}",
            n.home.display(),
            n.address,
            n.rpc,
            n.p2p
        );
    }
    println!("start each with: keel start --home <home>");
    Ok(())
}

fn devnet(args: DevnetArgs) -> Result<()> {
    if args.validators != 1 {
        bail!("--validators {}: this build runs one validator; multi-validator devnets need networking", args.validators);
    }
    let (root, _temp): (PathBuf, Option<tempfile::TempDir>) = match &args.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("keel-devnet-")
                .tempdir()
                .context("creating a temporary folder")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let node_home = root.join("node0");
    let home = Home::new(&node_home);
    let mut accounts = Vec::new();
    for i in 0..args.accounts {
        let path = root.join("accounts").join(format!("account{i}.key"));
        let key = if path.exists() {
            home::read_key_file(&path)?
        } else {
            let k = keel_types::Keypair::generate();
            home::write_key_file(&path, &k)?;
            k
        };
        accounts.push((path, key.address()));
    }
    let fresh = !home.genesis().exists();
    if fresh {
        std::fs::create_dir_all(&node_home)
            .with_context(|| format!("creating {}", node_home.display()))?;
        let validator = keel_types::Keypair::generate();
        home::write_key_file(&home.validator_key(), &validator)?;
        let extra: Vec<Address> = accounts.iter().map(|(_, a)| *a).collect();
        let genesis = Genesis::generate("keel-devnet", now_ms(), &[validator.public()], &extra);
        std::fs::write(home.genesis(), genesis.to_json_pretty()).context("writing genesis.json")?;
    }
    home::init(&node_home, "node0", "keel-devnet", now_ms())?;
    let mut config = Config::load(&home.config())?;
    config.rpc.listen_addr = args
        .rpc_addr
        .parse()
        .with_context(|| format!("--rpc-addr {}", args.rpc_addr))?;
    config.consensus.block_time_ms = args.block_time_ms;
    config.consensus.timeout_ms = config
        .consensus
        .timeout_ms
        .max(args.block_time_ms.saturating_mul(2));
    config.validate()?;
    std::fs::write(home.config(), config.to_toml_string()).context("writing config.toml")?;

    let validator = home::read_key_file(&home.validator_key())?;
    let rpc_url = format!("http://{}", config.rpc.listen_addr);
    println!(
        "keel devnet: 1 validator, block time {} ms",
        args.block_time_ms
    );
    println!(
        "  folder:         {}{}",
        root.display(),
        if _temp.is_some() {
            " (removed on exit)"
        } else {
            ""
        }
    );
    println!("  node0 home:     {}", node_home.display());
    println!("  JSON-RPC:       {rpc_url} (HTTP and WebSocket), GET {rpc_url}/health");
    println!(
        "  validator:      {} (key {})",
        validator.address(),
        home.validator_key().display()
    );
    for (path, address) in &accounts {
        println!("  funded account: {address} (key {})", path.display());
    }
    if let Some((path, _)) = accounts.first() {
        println!("try:");
        println!("  keel status");
        println!(
            "  keel tx transfer --key {} --to {} --amount 1000 --wait",
            path.display(),
            accounts
                .get(1)
                .map(|(_, a)| *a)
                .unwrap_or(validator.address())
        );
    }
    println!("press Ctrl-C to stop");
    crate::logging::init(&config.log)?;
    runtime()?.block_on(run_node(&node_home, config))
}

async fn query(q: QueryCommand) -> Result<()> {
    match q {
        QueryCommand::Account {
            address,
            height,
            prove,
            rpc,
        } => {
            let addr: Address = address
                .parse()
                .with_context(|| format!("address {address:?}"))?;
            let rpc = Rpc::new(&rpc)?;
            let h = height.map(|h| json!(h)).unwrap_or(Value::Null);
            if !prove {
                print_json(&rpc.call("state_getAccount", vec![json!(addr), h]).await?);
                return Ok(());
            }
            let result = rpc.call("state_getProof", vec![json!(addr), h]).await?;
            let at = result["height"]
                .as_u64()
                .ok_or_else(|| anyhow!("node returned no height"))?;
            let header = rpc.call("chain_getHeader", vec![json!(at)]).await?;
            let root: Hash = serde_json::from_value(header["state_root"].clone())
                .context("header state_root")?;
            let proof: Proof = serde_json::from_value(result["proof"].clone()).context("proof")?;
            let value = match result["value"].as_str() {
                Some(v) => Some(hex::decode(v.trim_start_matches("0x")).context("proof value")?),
                None => None,
            };
            verify_proof(
                &root,
                &keel_state::account_key(&addr),
                value.as_deref(),
                &proof,
            )
            .map_err(|e| {
                anyhow!("proof does NOT verify against the state root of block {at}: {e}")
            })?;
            print_json(&json!({
                "account": result["account"],
                "height": at,
                "state_root": root,
                "proof_verified": true,
            }));
            Ok(())
        }
        QueryCommand::Block { height, full, rpc } => {
            print_json(
                &Rpc::new(&rpc)?
                    .call("chain_getBlock", vec![json!(height), json!(full)])
                    .await?,
            );
            Ok(())
        }
        QueryCommand::Tx { hash, rpc } => {
            let h: Hash = hash.parse().with_context(|| format!("hash {hash:?}"))?;
            print_json(
                &Rpc::new(&rpc)?
                    .call("chain_getTransaction", vec![json!(h)])
                    .await?,
            );
            Ok(())
        }
        QueryCommand::Validators { rpc } => {
            print_json(&Rpc::new(&rpc)?.call("state_getValidators", vec![]).await?);
            Ok(())
        }
    }
}

async fn tx(t: TxCommand) -> Result<()> {
    let (kind, opts) = match t {
        TxCommand::Transfer { to, amount, opts } => {
            let to: Address = to.parse().with_context(|| format!("--to {to:?}"))?;
            (TxKind::Transfer { to, amount }, opts)
        }
        TxCommand::Bond { amount, opts } => (TxKind::Bond { amount }, opts),
        TxCommand::Unbond { amount, opts } => (TxKind::Unbond { amount }, opts),
    };
    send(kind, opts).await
}

async fn send(kind: TxKind, opts: TxOptions) -> Result<()> {
    let key = home::read_key_file(&opts.key)?;
    let rpc = Rpc::new(&opts.rpc)?;
    let status = rpc.call("chain_status", vec![]).await?;
    let chain_id = status["chain_id"]
        .as_str()
        .ok_or_else(|| anyhow!("node returned no chain_id"))?
        .to_string();
    let nonce = match opts.nonce {
        Some(n) => n,
        None => {
            let acc = rpc
                .call("state_getAccount", vec![json!(key.address())])
                .await?;
            acc["next_nonce"]
                .as_u64()
                .or_else(|| acc["nonce"].as_u64())
                .ok_or_else(|| anyhow!("node returned no nonce"))?
        }
    };
    let fee = match opts.fee {
        Some(f) => f,
        None => status["min_fee"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1),
    };
    let tx = Transaction::sign(&key, &chain_id, nonce, fee, kind);
    let hash = rpc
        .call(
            "tx_submit",
            vec![json!(format!("0x{}", hex::encode(&tx.bytes)))],
        )
        .await?;
    println!("submitted {}", hash.as_str().unwrap_or_default());
    if !opts.wait {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(opts.wait_timeout_s);
    loop {
        let s = rpc.call("tx_status", vec![json!(tx.hash)]).await?;
        match s.as_str() {
            Some("finalized") => break,
            Some("unknown") => bail!("transaction {} was dropped by the node", tx.hash),
            _ if Instant::now() > deadline => {
                bail!(
                    "transaction {} not final after {} s (status {s})",
                    tx.hash,
                    opts.wait_timeout_s
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let result = rpc
        .call("chain_getTransaction", vec![json!(tx.hash)])
        .await?;
    print_json(&result);
    if result["receipt"]["success"] == json!(false) {
        bail!(
            "transaction failed: {}",
            result["receipt"]["error"]
                .as_str()
                .unwrap_or("unknown reason")
        );
    }
    Ok(())
}
