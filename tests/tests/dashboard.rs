//! The Grafana dashboard (`docs/grafana-dashboard.json`, described in `docs/dashboard.md`)
//! against a real node.
//!
//! - `the_dashboard_is_portable`: it parses, its data source is the `datasource` variable
//!   everywhere (no data source uid of one Grafana), and it names no instance (no address, no
//!   host, no selected value saved in a variable).
//! - `every_metric_the_dashboard_queries_exists_on_a_running_node`: a single-validator
//!   `keel start` that has produced blocks, committed transfers and answered RPC calls serves
//!   on `/metrics` every series every query of the dashboard selects (name, and each label
//!   value a query fixes), with the type the query's suffix implies; and, if `promtool` is on
//!   `PATH`, `promtool check metrics` accepts that exposition.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use keel_node::config::{ByteSize, Config};
use keel_tests::{http_request, transfer, ChildGuard, TestNode, TEST_CHAIN_ID};
use keel_types::Keypair;
use serde_json::{json, Value};

/// The dashboard, read at build time so a change to it rebuilds this test.
const DASHBOARD: &str = include_str!("../../docs/grafana-dashboard.json");

/// What the data source of every panel, target and query variable must be.
const DATASOURCE_UID: &str = "${datasource}";

/// The template variables that choose the series; a query matches them, never a fixed value.
const SCOPE_VARIABLES: [&str; 2] = ["job", "instance"];

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("docs/grafana-dashboard.json is not JSON")
}

// ---------------------------------------------------------------------------------------------
// PromQL: the series a query selects
// ---------------------------------------------------------------------------------------------

/// One label matcher of a selector: `label op "value"`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

/// A `keel_*` metric selector found in a query.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    name: String,
    matchers: Vec<Matcher>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Reads a double-quoted string starting at `chars[*i]` (the quote), unescaping `\x`.
fn quoted(chars: &[char], i: &mut usize) -> Option<String> {
    if chars.get(*i) != Some(&'"') {
        return None;
    }
    *i += 1;
    let mut out = String::new();
    while let Some(&c) = chars.get(*i) {
        *i += 1;
        match c {
            '"' => return Some(out),
            '\\' => {
                let next = *chars.get(*i)?;
                *i += 1;
                out.push(match next {
                    'n' => '\n',
                    other => other,
                });
            }
            c => out.push(c),
        }
    }
    None
}

fn skip_spaces(chars: &[char], i: &mut usize) {
    while chars.get(*i).is_some_and(|c| c.is_whitespace()) {
        *i += 1;
    }
}

/// The label matchers inside `{...}`, `chars[*i]` being the `{`.
fn matchers(chars: &[char], i: &mut usize, expr: &str) -> Vec<Matcher> {
    let mut out = Vec::new();
    *i += 1;
    loop {
        skip_spaces(chars, i);
        match chars.get(*i) {
            Some('}') => {
                *i += 1;
                return out;
            }
            Some(',') => {
                *i += 1;
                continue;
            }
            None => panic!("unterminated label matchers in {expr:?}"),
            _ => {}
        }
        let start = *i;
        while chars.get(*i).copied().is_some_and(is_ident) {
            *i += 1;
        }
        let label: String = chars[start..*i].iter().collect();
        skip_spaces(chars, i);
        let op_start = *i;
        while chars.get(*i).is_some_and(|c| matches!(c, '=' | '!' | '~')) {
            *i += 1;
        }
        let op: String = chars[op_start..*i].iter().collect();
        skip_spaces(chars, i);
        let value = quoted(chars, i)
            .unwrap_or_else(|| panic!("label {label:?} has no quoted value in {expr:?}"));
        assert!(
            !label.is_empty() && ["=", "!=", "=~", "!~"].contains(&op.as_str()),
            "cannot read matcher {label:?} {op:?} in {expr:?}"
        );
        out.push(Matcher { label, op, value });
    }
}

/// Every `keel_*` metric selector in a PromQL expression (names inside label values are
/// not selectors and are skipped).
fn selectors(expr: &str) -> Vec<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            quoted(&chars, &mut i).unwrap_or_else(|| panic!("unterminated string in {expr:?}"));
            continue;
        }
        if !is_ident(c) {
            i += 1;
            continue;
        }
        let start = i;
        while chars.get(i).copied().is_some_and(is_ident) {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        if !name.starts_with("keel_") {
            continue;
        }
        let mut j = i;
        skip_spaces(&chars, &mut j);
        let matchers = if chars.get(j) == Some(&'{') {
            i = j;
            matchers(&chars, &mut i, expr)
        } else {
            Vec::new()
        };
        out.push(Selector { name, matchers });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The dashboard's queries
// ---------------------------------------------------------------------------------------------

/// `(where, query)` of every PromQL query in the dashboard: panel targets' `expr` and the
/// query variables' queries.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let panels = dashboard["panels"].as_array().expect("no panels");
    for panel in panels.iter().chain(
        panels
            .iter()
            .flat_map(|p| p["panels"].as_array().into_iter().flatten()),
    ) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_else(|| {
                panic!("panel {:?}: a target has no expr: {target}", panel["title"])
            });
            out.push((
                format!("panel {:?}", panel["title"].as_str().unwrap_or("?")),
                expr.to_string(),
            ));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] == json!("query") {
            let query = var["query"]["query"]
                .as_str()
                .or_else(|| var["query"].as_str())
                .unwrap_or_else(|| panic!("variable {:?} has no query", var["name"]));
            out.push((format!("variable {:?}", var["name"]), query.to_string()));
        }
    }
    out
}

/// Every object under a `datasource` key, with its path.
fn datasources<'a>(v: &'a Value, path: &str, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let here = format!("{path}.{k}");
                if k == "datasource" {
                    out.push((here.clone(), child));
                }
                datasources(child, &here, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                datasources(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Every string in `v`, with its path.
fn strings<'a>(v: &'a Value, path: &str, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::String(s) => out.push((path.to_string(), s)),
        Value::Object(map) => {
            for (k, child) in map {
                strings(child, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                strings(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Why `s` looks like it names one machine: an IPv4 address, `localhost`, or `host:port`.
fn names_a_machine(s: &str) -> Option<String> {
    if s.contains("localhost") {
        return Some("`localhost`".into());
    }
    let chars: Vec<char> = s.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if *c != ':' || i == 0 || !chars[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let digits = chars[i + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits >= 2 {
            return Some(format!("a host:port around byte {i}"));
        }
    }
    s.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|tok| {
            let parts: Vec<&str> = tok.split('.').collect();
            parts.len() == 4
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.parse::<u8>().is_ok())
        })
        .map(|ip| format!("the address {ip}"))
}

#[test]
fn the_dashboard_is_portable() {
    let d = dashboard();
    let mut problems = Vec::new();

    let schema = d["schemaVersion"].as_u64().unwrap_or(0);
    if schema < 36 {
        problems.push(format!(
            "schemaVersion {schema}: Grafana 10 dashboards are 36 or later"
        ));
    }
    if !d["id"].is_null() {
        problems.push(format!(
            "id is {}: an importable dashboard has null",
            d["id"]
        ));
    }
    if d.get("__inputs").is_some() {
        problems.push("__inputs: the data source is a variable, not an import input".into());
    }

    // The variables: a Prometheus data source, then job and instance drawn from it.
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let var = |name: &str| vars.iter().find(|v| v["name"] == json!(name)).cloned();
    match var("datasource") {
        Some(v) if v["type"] == json!("datasource") && v["query"] == json!("prometheus") => {}
        other => problems.push(format!(
            "no `datasource` variable of type datasource for prometheus: {other:?}"
        )),
    }
    for name in SCOPE_VARIABLES {
        match var(name) {
            Some(v)
                if v["type"] == json!("query")
                    && v["multi"] == json!(true)
                    && v["includeAll"] == json!(true) => {}
            other => problems.push(format!(
                "no multi-value `{name}` query variable with All: {other:?}"
            )),
        }
    }
    for v in &vars {
        // A saved selection would be one machine's name, shown to whoever imports it.
        let current = &v["current"];
        let empty = current.is_null() || current.as_object().is_some_and(|m| m.is_empty());
        if !empty && current["value"] != json!("$__all") && current["value"] != json!(["$__all"]) {
            problems.push(format!(
                "variable {:?} saves a selection: {current}",
                v["name"]
            ));
        }
        if v["options"].as_array().is_some_and(|o| !o.is_empty()) {
            problems.push(format!("variable {:?} saves its options", v["name"]));
        }
    }

    // The data source: the variable everywhere but Grafana's own annotations.
    let mut found = Vec::new();
    datasources(&d, "", &mut found);
    for (path, ds) in &found {
        let uid = ds["uid"].as_str().or_else(|| ds.as_str()).unwrap_or("");
        let builtin = ds["type"] == json!("grafana") && uid == "-- Grafana --";
        let variable = uid == DATASOURCE_UID && ds["type"] == json!("prometheus");
        if !((builtin && path.starts_with(".annotations")) || variable) {
            problems.push(format!(
                "{path}: data source {ds} is not {{\"type\": \"prometheus\", \"uid\": \"{DATASOURCE_UID}\"}}"
            ));
        }
    }
    let panels = d["panels"].as_array().cloned().unwrap_or_default();
    let mut ids = BTreeSet::new();
    let mut graphs = 0;
    for panel in &panels {
        let title = &panel["title"];
        if !ids.insert(panel["id"].as_u64().unwrap_or(0)) {
            problems.push(format!(
                "panel {title}: id {} repeats or is missing",
                panel["id"]
            ));
        }
        if panel["type"] == json!("row") {
            continue;
        }
        graphs += 1;
        if panel["datasource"]["uid"] != json!(DATASOURCE_UID) {
            problems.push(format!("panel {title}: no datasource {DATASOURCE_UID}"));
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel {title}: no queries"));
        }
        for t in &targets {
            if t["datasource"]["uid"] != json!(DATASOURCE_UID) {
                problems.push(format!(
                    "panel {title}: target {} has no datasource {DATASOURCE_UID}",
                    t["refId"]
                ));
            }
        }
    }
    if graphs < 20 {
        problems.push(format!("only {graphs} panels"));
    }

    // No machine anywhere, and every query scoped by the variables, never by a fixed value.
    let mut all = Vec::new();
    strings(&d, "", &mut all);
    for (path, s) in all {
        if let Some(why) = names_a_machine(s) {
            problems.push(format!("{path}: {why} in {s:?}"));
        }
    }
    for (place, expr) in queries(&d) {
        for sel in selectors(&expr) {
            for m in &sel.matchers {
                if SCOPE_VARIABLES.contains(&m.label.as_str())
                    && (m.op != "=~" || m.value != format!("${}", m.label))
                {
                    problems.push(format!(
                        "{place}: {}{{{}{}{:?}}} fixes the {} (use {}=~\"${}\")",
                        sel.name, m.label, m.op, m.value, m.label, m.label, m.label
                    ));
                }
            }
            let scoped = SCOPE_VARIABLES
                .iter()
                .all(|v| sel.matchers.iter().any(|m| m.label == *v));
            if place.starts_with("panel") && !scoped {
                problems.push(format!(
                    "{place}: {} is not scoped by $job and $instance in {expr:?}",
                    sel.name
                ));
            }
        }
    }

    assert!(
        problems.is_empty(),
        "docs/grafana-dashboard.json:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_query_reader_finds_selectors_and_skips_strings() {
    let sels = selectors(
        r#"sum by (instance, le) (rate(keel_a_bucket{job=~"$job", code!="0",x="keel_b"}[5m])) / on (instance) keel_c"#,
    );
    assert_eq!(
        sels,
        vec![
            Selector {
                name: "keel_a_bucket".into(),
                matchers: vec![
                    Matcher {
                        label: "job".into(),
                        op: "=~".into(),
                        value: "$job".into()
                    },
                    Matcher {
                        label: "code".into(),
                        op: "!=".into(),
                        value: "0".into()
                    },
                    Matcher {
                        label: "x".into(),
                        op: "=".into(),
                        value: "keel_b".into()
                    },
                ],
            },
            Selector {
                name: "keel_c".into(),
                matchers: vec![]
            },
        ]
    );
    assert_eq!(names_a_machine("{{instance}} p99"), None);
    assert_eq!(names_a_machine("$__rate_interval"), None);
    assert!(names_a_machine("node0.example:26660").is_some());
    assert!(names_a_machine("10.0.0.7").is_some());
    assert!(names_a_machine("localhost").is_some());
}

// ---------------------------------------------------------------------------------------------
// The exposition
// ---------------------------------------------------------------------------------------------

/// A `/metrics` body: the `# TYPE` of each family and the label sets of each sample name.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    e.types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let chars: Vec<char> = line.chars().collect();
            let mut i = 0;
            while chars.get(i).copied().is_some_and(is_ident) {
                i += 1;
            }
            let name: String = chars[..i].iter().collect();
            let labels = if chars.get(i) == Some(&'{') {
                matchers(&chars, &mut i, line)
                    .into_iter()
                    .map(|m| (m.label, m.value))
                    .collect()
            } else {
                BTreeMap::new()
            };
            e.samples.entry(name).or_default().push(labels);
        }
        e
    }

    /// The family a sample name belongs to and the type a query of that name implies.
    fn family_of(name: &str) -> (&str, Option<&'static str>) {
        for (suffix, kind) in [
            ("_total", "counter"),
            ("_bucket", "histogram"),
            ("_sum", "histogram"),
            ("_count", "histogram"),
        ] {
            if let Some(base) = name.strip_suffix(suffix) {
                return (base, Some(kind));
            }
        }
        (name, None)
    }

    /// What is wrong with `sel` against this exposition, if anything.
    fn check(&self, sel: &Selector) -> Vec<String> {
        let name = sel.name.as_str();
        let (family, implied) = Exposition::family_of(name);
        let mut out = Vec::new();
        let Some(series) = self.samples.get(name) else {
            let declared = self
                .types
                .get(name)
                .map(|k| (name, k))
                .or_else(|| self.types.get(family).map(|k| (family, k)));
            out.push(match declared {
                Some((f, k)) => format!("{name}: no sample (family {f} is a {k})"),
                None => format!("{name}: no such metric"),
            });
            return out;
        };
        // A counter's descriptor names its sample (`x_total`, the text format 0.0.4); a
        // histogram's names the family.
        let declared = self.types.get(name).or_else(|| self.types.get(family));
        match (implied, declared) {
            (Some(want), Some(kind)) if kind != want => out.push(format!(
                "{name}: queried as a {want} but {family} is a {kind}"
            )),
            (Some(want), None) => out.push(format!(
                "{name}: queried as a {want} but the exposition declares no {family}"
            )),
            _ => {}
        }
        // Prometheus adds `job` and `instance` when it scrapes: the exposition has neither.
        let fixed = sel.matchers.iter().filter(|m| {
            m.op == "=" && !m.value.contains('$') && !SCOPE_VARIABLES.contains(&m.label.as_str())
        });
        for m in fixed {
            if !series
                .iter()
                .any(|labels| labels.get(&m.label) == Some(&m.value))
            {
                let seen: BTreeSet<&str> = series
                    .iter()
                    .filter_map(|l| l.get(&m.label).map(String::as_str))
                    .collect();
                out.push(format!(
                    "{name}{{{}=\"{}\"}}: no such series ({} values seen: {seen:?})",
                    m.label, m.value, m.label
                ));
            }
        }
        out
    }
}

/// `promtool` on `PATH`, if there is one.
fn promtool() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file())
}

/// Runs `promtool check metrics` with `text` on stdin: `(success, what it printed)`.
fn promtool_check(promtool: &PathBuf, text: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning promtool");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut guard = ChildGuard::new(child);
    let body = text.to_string();
    let writer = thread::spawn(move || stdin.write_all(body.as_bytes()));
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = guard
        .wait_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("promtool did not finish within 60 s");
    writer.join().unwrap().expect("writing to promtool");
    let printed = format!("{}{}", out.join().unwrap(), err.join().unwrap());
    (status.success(), format!("promtool {status}\n{printed}"))
}

#[test]
fn every_metric_the_dashboard_queries_exists_on_a_running_node() {
    let d = dashboard();

    let mut node = TestNode::init().unwrap();
    // A memory limit, so the budget of every consumer is in force and exported.
    let mut config = Config::load(&node.config_path()).unwrap();
    config.memory.limit = ByteSize::mib(1024);
    config.validate().unwrap();
    fs::write(node.config_path(), config.to_toml_string()).unwrap();
    let metrics_addr: SocketAddr = config.metrics.listen_addr;
    node.start().unwrap();
    let rpc = node.rpc();
    rpc.wait_for_height(3, Duration::from_secs(30)).unwrap();

    // Two transfers committed, and an RPC error, so counters have moved.
    let key = node.validator_key().unwrap();
    let to = Keypair::generate().address();
    let txs: Vec<_> = (0..2)
        .map(|nonce| transfer(&key, TEST_CHAIN_ID, nonce, 1, to, 1_000))
        .collect();
    for tx in &txs {
        rpc.submit(tx).unwrap();
    }
    for tx in &txs {
        rpc.wait_finalized(&tx.hash, Duration::from_secs(30))
            .unwrap();
    }
    rpc.call_err("chain_getBlock", json!([u64::from(u32::MAX)]))
        .unwrap();
    rpc.wait_for_height(rpc.latest_height().unwrap() + 2, Duration::from_secs(30))
        .unwrap();

    let response = http_request(
        metrics_addr,
        "GET",
        "/metrics",
        b"",
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(response.status, 200, "GET /metrics: {response:?}");
    let text = String::from_utf8(response.body).unwrap();
    node.assert_running().unwrap();
    node.kill();

    let exposition = Exposition::parse(&text);
    let mut missing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut queried = BTreeSet::new();
    for (place, expr) in queries(&d) {
        for sel in selectors(&expr) {
            queried.insert(sel.name.clone());
            for problem in exposition.check(&sel) {
                missing.entry(problem).or_default().insert(place.clone());
            }
        }
    }
    assert!(
        queried.len() >= 20,
        "the dashboard queries only {queried:?}"
    );
    let mut problems: Vec<String> = missing
        .iter()
        .map(|(problem, places)| {
            let places: Vec<&str> = places.iter().map(String::as_str).collect();
            format!("{problem} [{}]", places.join(", "))
        })
        .collect();

    match promtool() {
        Some(path) => {
            let (ok, printed) = promtool_check(&path, &text);
            eprintln!("promtool check metrics: {printed}");
            if !ok {
                problems.push(format!(
                    "`promtool check metrics` refused the exposition: {printed}"
                ));
            }
        }
        None => eprintln!(
            "note: promtool is not on PATH: `promtool check metrics` skipped \
             (apt-get install prometheus, or a Prometheus release tarball, provides it)"
        ),
    }

    assert!(
        problems.is_empty(),
        "{} problem(s) with the dashboard's metrics on a running node:\n  {}\n--- /metrics ---\n{text}",
        problems.len(),
        problems.join("\n  ")
    );
}
