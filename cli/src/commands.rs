//! Subcommand implementations.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use keel_node::config::{ByteSize, Config};
use keel_node::home::{self, Home};
use keel_node::rpc::types::{BlockId, Height, SignedTxHex, TxStatus};
use keel_node::{Address, Hash, Keypair, Node, Transaction, TxKind};
use serde::Serialize;

use crate::args::{
    Cli, Command, DbCommand, DevnetArgs, KeysCommand, QueryCommand, TestnetArgs, TxCommand,
    TxOptions, DEFAULT_RPC,
};
use crate::client::{KeelApiClient, Rpc};

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

/// Prints `v` as indented JSON. It goes through a `serde_json::Value` on the way, whose
/// objects sort their keys: the output lists keys alphabetically whatever the field order of
/// the type.
/// A progress bar of `total` steps on stderr (hidden when stderr is not a terminal).
fn progress_bar(what: &'static str) -> impl FnMut(u64, u64) {
    let mut bar: Option<indicatif::ProgressBar> = None;
    move |done, total| {
        let bar = bar.get_or_insert_with(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} heights, {elapsed} elapsed, {eta} left",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(what);
            b
        });
        bar.set_length(total);
        bar.set_position(done);
        if done >= total {
            bar.finish();
        }
    }
}

fn db(cmd: DbCommand) -> Result<()> {
    use keel_node::dbtool::Db;
    match cmd {
        DbCommand::Stats { home, json } => {
            let stats = Db::open(&home)?.stats()?;
            if json {
                return print_json(&stats);
            }
            outln!("database        {}", stats.path);
            outln!("on disk         {} bytes", stats.disk_bytes);
            outln!("live tables     {} bytes", stats.live_sst_bytes);
            outln!("final height    {}", stats.finalized_height);
            outln!("earliest height {}", stats.earliest_height);
            let window = match (stats.keep_recent, stats.interval) {
                (Some(k), Some(i)) => format!(" (keep {k}, every {i})"),
                _ => String::new(),
            };
            outln!("pruning         {}{window}", stats.pruning_mode);
            let opt = |v: Option<u64>| v.map_or("none".to_string(), |v| v.to_string());
            outln!("pruned up to    {}", opt(stats.pruned_height));
            outln!("last target     {}", opt(stats.prune_target));
            outln!("prune due to    {}", opt(stats.prune_due_to));
            outln!("");
            outln!(
                "{:<14} {:>16} {:>14}",
                "column",
                "live bytes",
                "keys (est.)"
            );
            for c in &stats.columns {
                outln!(
                    "{:<14} {:>16} {:>14}",
                    c.name,
                    c.live_sst_bytes,
                    c.estimated_keys
                );
            }
            Ok(())
        }
        DbCommand::Prune { home } => {
            let db = Db::open(&home)?;
            match db.prune(&mut progress_bar("pruning"))? {
                None => outln!("nothing to prune now"),
                Some(r) => outln!(
                    "pruned heights {}..={}: {} keys deleted in {} batches",
                    r.from,
                    r.to,
                    r.deleted_keys,
                    r.batches
                ),
            }
            Ok(())
        }
        DbCommand::Compact { home } => {
            let (before, after) = Db::open(&home)?.compact()?;
            outln!("live table bytes: {before} before, {after} after");
            Ok(())
        }
        DbCommand::Check { home, json } => {
            let report = Db::open(&home)?.check(&mut progress_bar("checking"))?;
            if json {
                return print_json(&report);
            }
            outln!(
                "ok: heights {}..={}: {} blocks, {} transactions, {} state roots recomputed \
                 ({} distinct nodes), {} epoch-end headers below the window",
                report.from_height,
                report.to_height,
                report.blocks,
                report.transactions,
                report.state_versions,
                report.state_nodes,
                report.epoch_headers
            );
            Ok(())
        }
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    let v = serde_json::to_value(v).context("encoding the output")?;
    outln!(
        "{}",
        serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
    );
    Ok(())
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
            outln!("initialised {}", home.display());
            outln!("validator address: {}", r.address);
            if r.wrote_genesis {
                outln!("genesis.json: new chain {chain_id:?}, validator funded");
            } else {
                outln!("genesis.json: kept the existing file");
            }
            Ok(())
        }
        Command::Keys(KeysCommand::Generate { out }) => {
            let key = Keypair::generate();
            home::write_key_file(&out, &key)?;
            outln!("{}", key.address());
            Ok(())
        }
        Command::Keys(KeysCommand::Show { home }) => {
            let key = home::read_key_file(&Home::new(&home).validator_key())?;
            outln!("address:    {}", key.address());
            outln!("public key: {}", key.public());
            Ok(())
        }
        Command::Start { home } => {
            let config = Config::load(&Home::new(&home).config())?;
            crate::logging::init(&config.log)?;
            runtime()?.block_on(run_node(&home, config))
        }
        Command::Devnet(args) => devnet(args),
        Command::Testnet(args) => testnet(args),
        Command::Bench(args) => crate::bench::run(args),
        Command::Db(cmd) => db(cmd),
        Command::Status { rpc } => runtime()?.block_on(async {
            let rpc = Rpc::new(&rpc)?;
            print_json(&rpc.call("chain_status", rpc.api().chain_status()).await?)
        }),
        Command::Query(q) => runtime()?.block_on(query(q)),
        Command::Tx(t) => runtime()?.block_on(tx(t)),
        Command::Loadgen(args) => crate::loadgen::run(args),
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
    outln!(
        "keel testnet: {} validators of chain {} in {}",
        nodes.len(),
        args.chain_id,
        args.out.display()
    );
    for n in &nodes {
        outln!(
            "  {}  validator {}  rpc http://{}  p2p {}",
            n.home.display(),
            n.address,
            n.rpc,
            n.p2p
        );
    }
    outln!("start each with: keel start --home <home>");
    Ok(())
}

/// Chain id of a new devnet.
const DEVNET_CHAIN_ID: &str = "keel-devnet";

/// One node of a devnet, configured and ready to start.
struct DevnetNode {
    name: String,
    home: PathBuf,
    config: Config,
    validator: Address,
}

impl DevnetNode {
    fn rpc_url(&self) -> String {
        format!("http://{}", self.config.rpc.listen_addr)
    }
}

fn devnet(args: DevnetArgs) -> Result<()> {
    let rpc_addr: SocketAddr = args
        .rpc_addr
        .parse()
        .with_context(|| format!("--rpc-addr {}", args.rpc_addr))?;
    let (root, temp): (PathBuf, Option<tempfile::TempDir>) = match &args.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("keel-devnet-")
                .tempdir()
                .context("creating a temporary folder")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let fresh = !Home::new(root.join("node0")).config().exists();
    if fresh && args.validators == 0 {
        bail!("--validators must be at least 1");
    }
    let accounts = devnet_accounts(&root, args.accounts, fresh)?;
    if fresh {
        keel_node::testnet::generate(&keel_node::testnet::TestnetSpec {
            validators: args.validators,
            out: root.clone(),
            base_port: args.base_port,
            block_time_ms: args.block_time_ms,
            chain_id: DEVNET_CHAIN_ID.to_string(),
            genesis_time_ms: now_ms(),
            funded: accounts.iter().map(|(_, a)| *a).collect(),
            epoch_length: None,
        })?;
    }
    let nodes = devnet_nodes(&root, &args, rpc_addr, fresh)?;
    let Some(node0) = nodes.first() else {
        bail!("{} holds no devnet node", root.display());
    };
    let genesis = Home::new(&node0.home).load_genesis()?;

    outln!(
        "keel devnet: {} {} of chain {}, block time {} ms, all in this process{}",
        nodes.len(),
        if nodes.len() == 1 {
            "validator"
        } else {
            "validators"
        },
        genesis.chain_id,
        args.block_time_ms,
        if fresh { "" } else { " (restarted)" }
    );
    if !fresh && args.validators as usize != nodes.len() {
        outln!(
            "  note: {} already holds a {}-validator devnet; --validators {} applies to new folders only",
            root.display(),
            nodes.len(),
            args.validators
        );
    }
    outln!(
        "  folder:  {}{}",
        root.display(),
        if temp.is_some() {
            " (removed on exit)"
        } else {
            " (kept; run again with the same --dir to restart it)"
        }
    );
    for n in &nodes {
        outln!(
            "  {}:   RPC {}  validator {}  home {}",
            n.name,
            n.rpc_url(),
            n.validator,
            n.home.display()
        );
    }
    let rpc_url = node0.rpc_url();
    outln!("  JSON-RPC: HTTP and WebSocket on each RPC address, GET {rpc_url}/health");
    outln!("  validator keys: <home>/keys/validator.key (each validator's address is funded)");
    for (path, address) in &accounts {
        outln!("  funded account: {address} (key {})", path.display());
    }
    let rpc_flag = if rpc_url == DEFAULT_RPC {
        String::new()
    } else {
        format!(" --rpc {rpc_url}")
    };
    outln!("try:");
    outln!("  keel status{rpc_flag}");
    outln!("  keel query validators{rpc_flag}");
    if let Some((path, from)) = accounts.first() {
        let to = accounts.get(1).map(|(_, a)| *a).unwrap_or(node0.validator);
        outln!(
            "  keel tx transfer --key {} --to {to} --amount 1000 --wait{rpc_flag}",
            path.display()
        );
        outln!("  keel query account {from} --prove{rpc_flag}");
    }
    crate::logging::init(&node0.config.log)?;
    let result = runtime()?.block_on(run_devnet(&nodes));
    if let Some(t) = temp {
        let path = t.path().to_path_buf();
        if let Err(e) = t.close() {
            eprintln!("warning: could not remove {}: {e}", path.display());
        }
    }
    result
}

/// The funded extra accounts of a devnet, `(key file, address)`: on a new devnet `count` of
/// them (keys already in `ROOT/accounts/` are kept), on a restart the keys already there.
fn devnet_accounts(root: &Path, count: u32, fresh: bool) -> Result<Vec<(PathBuf, Address)>> {
    let path = |i: u32| root.join("accounts").join(format!("account{i}.key"));
    let mut accounts = Vec::new();
    if fresh {
        for i in 0..count {
            let p = path(i);
            let key = if p.exists() {
                home::read_key_file(&p)?
            } else {
                let k = Keypair::generate();
                home::write_key_file(&p, &k)?;
                k
            };
            accounts.push((p, key.address()));
        }
    } else {
        for i in 0.. {
            let p = path(i);
            if !p.exists() {
                break;
            }
            let key = home::read_key_file(&p)?;
            accounts.push((p, key.address()));
        }
    }
    Ok(accounts)
}

/// Loads the configs of the devnet in `root`, applies the command line (block time, node0's
/// RPC address) and, on a new devnet, small RocksDB caches (all nodes share one process),
/// checks that no two nodes want one port, and writes back what changed.
fn devnet_nodes(
    root: &Path,
    args: &DevnetArgs,
    rpc_addr: SocketAddr,
    fresh: bool,
) -> Result<Vec<DevnetNode>> {
    let default_timeout = Config::default().consensus.timeout_ms;
    let mut nodes = Vec::new();
    let mut changed = Vec::new();
    for (i, dir) in keel_node::testnet::homes(root).into_iter().enumerate() {
        let home = Home::new(&dir);
        let mut config = Config::load(&home.config())?;
        let mut dirty = false;
        if fresh {
            config.storage.rocksdb.block_cache_size = ByteSize::mib(64);
            config.storage.rocksdb.write_buffer_size = ByteSize::mib(16);
            dirty = true;
        }
        if config.consensus.block_time_ms != args.block_time_ms {
            config.consensus.block_time_ms = args.block_time_ms;
            config.consensus.timeout_ms = default_timeout.max(args.block_time_ms.saturating_mul(2));
            dirty = true;
        }
        if i == 0 && config.rpc.listen_addr != rpc_addr {
            config.rpc.listen_addr = rpc_addr;
            dirty = true;
        }
        config.validate()?;
        let validator = home::read_key_file(&home.validator_key())?.address();
        changed.push(dirty);
        nodes.push(DevnetNode {
            name: format!("node{i}"),
            home: dir,
            config,
            validator,
        });
    }
    check_devnet_ports(&nodes)?;
    for (n, dirty) in nodes.iter().zip(changed) {
        if dirty {
            let path = Home::new(&n.home).config();
            std::fs::write(&path, n.config.to_toml_string())
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(nodes)
}

/// Refuses a devnet in which two listeners share a port (say `--rpc-addr` on another node's
/// p2p port), before anything binds.
fn check_devnet_ports(nodes: &[DevnetNode]) -> Result<()> {
    let mut seen: Vec<(u16, String)> = Vec::new();
    for n in nodes {
        let p2p = n
            .config
            .p2p
            .listen_addr
            .rsplit_once("/tcp/")
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|p| p.parse::<u16>().ok());
        let ports = [
            (Some(n.config.rpc.listen_addr.port()), "RPC"),
            (p2p, "p2p"),
            (Some(n.config.metrics.listen_addr.port()), "metrics"),
        ];
        for (port, what) in ports {
            let Some(port) = port.filter(|p| *p != 0) else {
                continue;
            };
            let label = format!("{}'s {what} port", n.name);
            if let Some((_, other)) = seen.iter().find(|(p, _)| *p == port) {
                bail!(
                    "port {port} is both {other} and {label}; choose another --rpc-addr or --base-port"
                );
            }
            seen.push((port, label));
        }
    }
    Ok(())
}

/// Starts every node of a devnet on this runtime and runs them until SIGINT/SIGTERM or until
/// one's consensus driver stops; then shuts them all down. An error if a node failed.
async fn run_devnet(nodes: &[DevnetNode]) -> Result<()> {
    let mut running: Vec<Node> = Vec::with_capacity(nodes.len());
    for n in nodes {
        match Node::start(&n.home, n.config.clone()).await {
            Ok(node) => running.push(node),
            Err(e) => {
                stop_nodes(running).await;
                return Err(anyhow::Error::new(e).context(format!("starting {}", n.name)));
            }
        }
    }
    outln!(
        "devnet running: {} nodes, RPC {}; press Ctrl-C to stop",
        running.len(),
        nodes.first().map(DevnetNode::rpc_url).unwrap_or_default()
    );

    enum Outcome {
        Signal(Result<()>),
        Failed(usize, keel_node::Result<()>),
    }
    let outcome = {
        let mut watches: Vec<Pin<Box<dyn Future<Output = keel_node::Result<()>> + Send + '_>>> =
            running
                .iter_mut()
                .map(|n| Box::pin(n.failed()) as Pin<Box<dyn Future<Output = _> + Send + '_>>)
                .collect();
        let any_failed = std::future::poll_fn(|cx| {
            for (i, w) in watches.iter_mut().enumerate() {
                if let Poll::Ready(r) = w.as_mut().poll(cx) {
                    return Poll::Ready((i, r));
                }
            }
            Poll::Pending
        });
        tokio::select! {
            r = shutdown_signal() => Outcome::Signal(r),
            (i, r) = any_failed => Outcome::Failed(i, r),
        }
    };
    tracing::info!("shutting down the devnet");
    let stopped_cleanly = stop_nodes(running).await;
    match outcome {
        Outcome::Signal(r) => {
            r?;
            if !stopped_cleanly {
                bail!("a node did not shut down cleanly (see the log)");
            }
            outln!("devnet stopped");
            Ok(())
        }
        Outcome::Failed(i, r) => {
            let name = nodes.get(i).map_or("a node", |n| n.name.as_str());
            match r {
                Err(e) => bail!("{name}: consensus driver failed: {e}"),
                Ok(()) => bail!("{name}: consensus driver stopped unexpectedly"),
            }
        }
    }
}

/// Shuts the nodes down, all at once; whether every one stopped cleanly.
async fn stop_nodes(nodes: Vec<Node>) -> bool {
    let tasks: Vec<_> = nodes
        .into_iter()
        .map(|n| tokio::spawn(n.shutdown()))
        .collect();
    let mut clean = true;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(node = i, error = %e, "node shutdown failed");
                clean = false;
            }
            Err(e) => {
                tracing::warn!(node = i, error = %e, "node shutdown task failed");
                clean = false;
            }
        }
    }
    clean
}

async fn query(q: QueryCommand) -> Result<()> {
    match q {
        QueryCommand::Account {
            address,
            height,
            prove,
            genesis,
            trust,
            rpc,
        } => {
            let addr: Address = address
                .parse()
                .with_context(|| format!("address {address:?}"))?;
            let trust = match (genesis, trust) {
                (Some(path), _) => crate::prove::Trust::Genesis(path),
                (None, Some(checkpoint)) => crate::prove::Trust::parse_checkpoint(&checkpoint)?,
                (None, None) => crate::prove::Trust::Node,
            };
            let rpc = Rpc::new(&rpc)?;
            let height = height.map(Height);
            if !prove {
                let account = rpc
                    .call(
                        "state_getAccount",
                        rpc.api().state_get_account(addr, height),
                    )
                    .await?;
                return print_json(&account);
            }
            let proved = crate::prove::prove_account(&rpc, addr, height, &trust).await?;
            // Each verdict on stderr as it is human text; stdout stays one JSON object.
            let mut err = std::io::stderr().lock();
            for step in &proved.steps {
                let _ = std::io::Write::write_fmt(&mut err, format_args!("{step}\n"));
            }
            print_json(&proved)
        }
        QueryCommand::Block { height, full, rpc } => {
            let rpc = Rpc::new(&rpc)?;
            let block = rpc
                .call(
                    "chain_getBlock",
                    rpc.api()
                        .chain_get_block(BlockId::Height(height), Some(full)),
                )
                .await?;
            print_json(&block)
        }
        QueryCommand::Tx { hash, rpc } => {
            let h: Hash = hash.parse().with_context(|| format!("hash {hash:?}"))?;
            let rpc = Rpc::new(&rpc)?;
            let tx = rpc
                .call("chain_getTransaction", rpc.api().chain_get_transaction(h))
                .await?;
            print_json(&tx)
        }
        QueryCommand::Validators { rpc } => {
            let rpc = Rpc::new(&rpc)?;
            let validators = rpc
                .call("state_getValidators", rpc.api().state_get_validators(None))
                .await?;
            print_json(&validators)
        }
        QueryCommand::Header { height, rpc } => {
            let rpc = Rpc::new(&rpc)?;
            let header = rpc
                .call(
                    "chain_getHeader",
                    rpc.api().chain_get_header(BlockId::Height(height)),
                )
                .await?;
            print_json(&header)
        }
        QueryCommand::Finality { height, rpc } => {
            let rpc = Rpc::new(&rpc)?;
            let proof = rpc
                .call(
                    "chain_getFinalityProof",
                    rpc.api().chain_get_finality_proof(Height(height)),
                )
                .await?;
            print_json(&proof)
        }
        QueryCommand::EpochChange { epoch, rpc } => {
            let rpc = Rpc::new(&rpc)?;
            let change = rpc
                .call(
                    "chain_getEpochChange",
                    rpc.api().chain_get_epoch_change(epoch),
                )
                .await?;
            print_json(&change)
        }
        QueryCommand::Rpc {
            method,
            params,
            rpc,
        } => {
            let params: Option<serde_json::Value> = params
                .map(|p| {
                    serde_json::from_str(&p).with_context(|| format!("params {p:?} are not JSON"))
                })
                .transpose()?;
            let rpc = Rpc::new(&rpc)?;
            let result = rpc.call_raw(&method, params).await?;
            print_json(&result)
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
    let status = rpc.call("chain_status", rpc.api().chain_status()).await?;
    let nonce = match opts.nonce {
        Some(n) => n,
        None => {
            let acc = rpc
                .call(
                    "state_getAccount",
                    rpc.api().state_get_account(key.address(), None),
                )
                .await?;
            acc.next_nonce.unwrap_or(acc.nonce)
        }
    };
    let fee = opts.fee.unwrap_or(status.min_fee);
    let tx = Transaction::sign(&key, &status.chain_id, nonce, fee, kind);
    let hash = rpc
        .call(
            "tx_submit",
            rpc.api().tx_submit(SignedTxHex::from_bytes(&tx.bytes)),
        )
        .await?;
    outln!("submitted {hash}");
    if !opts.wait {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(opts.wait_timeout_s);
    loop {
        let s = rpc.call("tx_status", rpc.api().tx_status(tx.hash)).await?;
        match s {
            TxStatus::Finalized => break,
            TxStatus::Unknown => bail!("transaction {} was dropped by the node", tx.hash),
            _ if Instant::now() > deadline => {
                bail!(
                    "transaction {} not final after {} s (status \"{}\")",
                    tx.hash,
                    opts.wait_timeout_s,
                    s.as_str()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let result = rpc
        .call(
            "chain_getTransaction",
            rpc.api().chain_get_transaction(tx.hash),
        )
        .await?;
    print_json(&result)?;
    if let Some(receipt) = result.receipt.filter(|r| !r.success) {
        bail!(
            "transaction failed: {}",
            receipt.error.as_deref().unwrap_or("unknown reason")
        );
    }
    Ok(())
}
