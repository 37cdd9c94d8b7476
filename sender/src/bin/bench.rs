//! `coinflow-bench`: measures the durable pipeline against a bare hyper server in one run
//! on one machine, and reports ratios; between the two, the edge in front of an ingest stub
//! that stores nothing shows what the HTTP edge and the gRPC hop cost by themselves. See
//! BENCHMARKS.md. Run it through `scripts/bench`, which builds the release binaries first.
//! Besides printing its Markdown report, it writes the report, its rows as JSON and their
//! chart as SVG ([`coinflow_sender::chart`]); `--chart-from` only redraws a chart.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use coinflow_sender::chart::{self, BenchReport, BenchRow, Rss};
use coinflow_sender::deliver::{Report, Sender, Target};
use coinflow_sender::generate::event;
use coinflow_shared::proto::v1::ingest_server::{Ingest, IngestServer};
use coinflow_shared::proto::v1::{
    DeliverBatchRequest, DeliverBatchResponse, DeliverRequest, DeliverResponse, DeliverResult,
    Outcome, deliver_result,
};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sqlx::Connection;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::server::TcpIncoming;

const KEY: &str = "cf_whk_bench_key";

/// Measure the pipeline; print a Markdown report and write it with its rows (JSON) and
/// their chart (SVG).
#[derive(Parser)]
struct Cli {
    /// Events per closed-loop measurement.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Concurrent senders in the closed loop.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The open-loop rate, events/s.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Seconds of open-loop load.
    #[arg(long, default_value_t = 5)]
    rate_seconds: u64,
    /// Rows pre-loaded for the "full ledger" measurement (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    preload: u64,
    /// Alternating rounds of a fresh ledger and the pre-loaded one (closed loop each);
    /// the full-ledger figure is the median ratio of the rounds.
    #[arg(long, default_value_t = 3)]
    full_rounds: usize,
    /// Afterwards, measure this many more alternating pairs of bare hyper and the SQLite
    /// pipeline (closed loop only) and report the median ratio: one pair is noisy on a
    /// shared machine.
    #[arg(long, default_value_t = 0)]
    pairs: usize,
    /// PostgreSQL server for the PostgreSQL pipeline ("" skips it).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres: String,
    /// An environment variable for both services, after the benchmark's own (e.g.
    /// `RUST_LOG=info` to measure with the services' default log level rather than
    /// warnings only, or `TOKIO_WORKER_THREADS=1`). Repeatable.
    #[arg(long = "service-env", value_name = "KEY=VALUE", value_parser = key_value)]
    service_env: Vec<(String, String)>,
    /// Measure the pipelines' rows this many times, SQLite's then PostgreSQL's each round:
    /// the table shows the first round, the ratios are the rounds' medians.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Measure only the rows whose name contains this (and bare hyper, the baseline).
    #[arg(long)]
    only: Option<String>,
    /// Also write the report as `<REPORT>.md` (what is printed), `<REPORT>.json` (the
    /// table's rows) and `<REPORT>.svg` (their chart). Default: `bench/<UTC time>` in the
    /// target directory (`target/bench/…` through scripts/bench).
    #[arg(long, value_name = "REPORT")]
    report: Option<PathBuf>,
    /// Draw the chart of an existing report's rows (`<REPORT>.json`) as `<REPORT>.svg`
    /// beside it, and exit without measuring anything.
    #[arg(long, value_name = "REPORT.json")]
    chart_from: Option<PathBuf>,
    /// Internal: run the bare hyper server.
    #[arg(long, hide = true)]
    bare_server: bool,
    /// Internal: run the ingest stub that acks every event without storing it.
    #[arg(long, hide = true)]
    stub_ingest: bool,
}

impl Cli {
    /// Whether `--only` lets the row `name` run.
    fn wants(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|only| name.contains(only))
    }
}

fn key_value(arg: &str) -> Result<(String, String), String> {
    arg.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {arg:?}"))
}

/// A bare hyper server: 200 `{"success":true}` to everything. The ceiling.
async fn bare_server() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                use http_body_util::BodyExt;
                let _ = req.into_body().collect().await;
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                    b"{\"success\":true}",
                ))))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// An `Ingest` that acks every event at once and stores nothing: with the real edge in
/// front of it, the ceiling of the edge and the gRPC hop before any storage. Never a
/// fulfillment: it only exists in the benchmark.
struct StubIngest;

#[tonic::async_trait]
impl Ingest for StubIngest {
    async fn deliver(
        &self,
        _request: tonic::Request<DeliverRequest>,
    ) -> Result<tonic::Response<DeliverResponse>, tonic::Status> {
        Ok(tonic::Response::new(stub_ack()))
    }

    async fn deliver_batch(
        &self,
        request: tonic::Request<DeliverBatchRequest>,
    ) -> Result<tonic::Response<DeliverBatchResponse>, tonic::Status> {
        let results = request
            .into_inner()
            .events
            .iter()
            .map(|_| DeliverResult {
                result: Some(deliver_result::Result::Ack(stub_ack())),
            })
            .collect();
        Ok(tonic::Response::new(DeliverBatchResponse { results }))
    }
}

fn stub_ack() -> DeliverResponse {
    DeliverResponse {
        outcome: Outcome::Granted.into(),
        duplicate: false,
        held_reason: None,
    }
}

async fn stub_ingest() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(IngestServer::new(StubIngest))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await?;
    Ok(())
}

struct Proc {
    child: Child,
    addr: SocketAddr,
    name: &'static str,
}

/// CPU seconds (user + system) that process `pid` has used, from `/proc/<pid>/stat`.
fn cpu_secs(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let rest = s.rsplit_once(')')?.1;
            let mut fields = rest.split_whitespace().skip(11);
            let utime: f64 = fields.next()?.parse().ok()?;
            let stime: f64 = fields.next()?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0)
}

/// CPU seconds every PostgreSQL server process (all named `postgres`) has used; a
/// backend that exits takes its time with it, so the pools' long-lived ones are what count.
fn postgres_cpu_secs() -> f64 {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    procs
        .flatten()
        .filter(|p| {
            std::fs::read_to_string(p.path().join("comm")).is_ok_and(|c| c.trim() == "postgres")
        })
        .map(|p| cpu_secs(&p.file_name().to_string_lossy()))
        .sum()
}

/// CPU seconds each thread of `pid` has used, summed by thread name.
fn thread_cpu_secs(pid: &str) -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        *by_name.entry(name.trim().to_owned()).or_insert(0.0) +=
            cpu_secs(&format!("{pid}/task/{tid}"));
    }
    by_name
}

impl Proc {
    fn cpu_secs(&self) -> f64 {
        self.child
            .id()
            .map_or(0.0, |pid| cpu_secs(&pid.to_string()))
    }

    fn thread_cpu_secs(&self) -> BTreeMap<String, f64> {
        self.child
            .id()
            .map(|pid| thread_cpu_secs(&pid.to_string()))
            .unwrap_or_default()
    }

    fn peak_rss_mib(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return 0.0;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .map(str::to_owned)
            })
            .and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join(name);
    if !path.exists() {
        bail!(
            "{} missing: run scripts/bench (it builds the release binaries)",
            path.display()
        );
    }
    Ok(path)
}

/// The services' log level in a measurement.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Log {
    /// Warnings only (and the start-up line the benchmark reads).
    Warn,
    /// The services' default (`info`: a line per delivery in each service, and every span).
    Default,
}

/// Starts a service and waits for its "listening" log line (JSON) for the address.
async fn start(
    name: &'static str,
    args: &[&str],
    env: &[(&str, &str)],
    log: Log,
    extra_env: &[(String, String)],
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(bin(name)?);
    cmd.args(args).env("LOG_FORMAT", "json");
    match log {
        Log::Warn => cmd.env(
            "RUST_LOG",
            "warn,fulfillment_svc::server=info,webhook_edge::server=info",
        ),
        Log::Default => cmd.env_remove("RUST_LOG"),
    };
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.envs(extra_env.iter().map(|(k, v)| (k, v)));
    let mut child = cmd.spawn()?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(a) = v["fields"]["addr"].as_str()
            {
                return Ok::<_, anyhow::Error>(a.parse::<SocketAddr>()?);
            }
        }
        bail!("{name} exited before listening")
    })
    .await??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Proc { child, addr, name })
}

/// Runs this binary with `flag` (one of the internal servers), which prints its address.
async fn start_internal(flag: &str, name: &'static str) -> anyhow::Result<Proc> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg(flag)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let addr = lines
        .next_line()
        .await?
        .with_context(|| format!("{name} address"))?
        .parse()?;
    Ok(Proc { child, addr, name })
}

async fn start_bare() -> anyhow::Result<Proc> {
    start_internal("--bare-server", "bare hyper").await
}

/// The real edge, delivering to `fulfillment_url` (comma-separated URLs: round robin).
async fn start_edge(fulfillment_url: &str, log: Log, cli: &Cli) -> anyhow::Result<Proc> {
    start(
        "webhook-edge",
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--fulfillment-url",
            fulfillment_url,
        ],
        &[
            ("COINFLOW_WEBHOOK_KEYS", KEY),
            ("EDGE_INGEST_TOKEN", "bench-ingest"),
        ],
        log,
        &cli.service_env,
    )
    .await
}

/// How a pipeline runs: its log level and how many fulfillment replicas share the ledger.
#[derive(Clone, Copy)]
struct Shape {
    log: Log,
    replicas: usize,
}

impl Shape {
    const WARN: Self = Self {
        log: Log::Warn,
        replicas: 1,
    };
}

/// The edge (first) and `shape.replicas` fulfillment replicas on the ledger at
/// `database_url`, the edge balancing over them.
async fn stack(database_url: &str, shape: Shape, cli: &Cli) -> anyhow::Result<Vec<Proc>> {
    let catalog = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/catalog.example.toml");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--database-url",
        database_url,
        "--catalog",
        catalog.to_str().context("path")?,
        "--migrate-on-start",
    ];
    let mut replicas = Vec::with_capacity(shape.replicas);
    for _ in 0..shape.replicas {
        replicas.push(
            start(
                "fulfillment-svc",
                &args,
                &[
                    ("FULFILLMENT_API_TOKENS", "bench"),
                    ("FULFILLMENT_INGEST_TOKENS", "bench-ingest"),
                ],
                shape.log,
                &cli.service_env,
            )
            .await?,
        );
    }
    let urls: Vec<String> = replicas
        .iter()
        .map(|r| format!("http://{}", r.addr))
        .collect();
    let mut procs = vec![start_edge(&urls.join(","), shape.log, cli).await?];
    procs.extend(replicas);
    Ok(procs)
}

fn bodies(prefix: &str, n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| {
            event(
                "Settled",
                &format!("{prefix}-{i}"),
                "sword",
                500,
                "2026-11-20T17:06:05.177Z",
            )
        })
        .collect()
}

/// A closed-loop measurement: the sender's report and the CPU time per event of each
/// process (the load generator is this process).
struct Closed {
    report: Report,
    cpu_us: Vec<(&'static str, f64)>,
    /// Per process, its threads by name (a thread that appeared during the run counts
    /// from zero).
    threads_us: Vec<(&'static str, BTreeMap<String, f64>)>,
}

async fn closed(procs: &[&Proc], prefix: &str, n: usize, concurrency: usize) -> Closed {
    let sender = sender(procs[0].addr);
    let bodies = bodies(prefix, n);
    let before: Vec<f64> = procs.iter().map(|p| p.cpu_secs()).collect();
    let threads_before: Vec<_> = procs.iter().map(|p| p.thread_cpu_secs()).collect();
    let own = cpu_secs("self");
    let postgres = postgres_cpu_secs();
    let progress = sender.progress(prefix, n);
    sender.closed_loop(bodies, concurrency).await;
    progress.finish().await;
    let per_event = |secs: f64| 1e6 * secs / n as f64;
    let threads_us = procs
        .iter()
        .zip(threads_before)
        .map(|(p, before)| {
            let mut after = p.thread_cpu_secs();
            for (name, secs) in &mut after {
                *secs = per_event(*secs - before.get(name).copied().unwrap_or(0.0));
            }
            (p.name, after)
        })
        .collect();
    let mut cpu_us: Vec<(&'static str, f64)> = procs
        .iter()
        .zip(before)
        .map(|(p, b)| (p.name, per_event(p.cpu_secs() - b)))
        .collect();
    cpu_us.push(("load generator", per_event(cpu_secs("self") - own)));
    let postgres = per_event(postgres_cpu_secs() - postgres);
    if postgres >= 1.0 {
        cpu_us.push(("postgres", postgres));
    }
    Closed {
        report: sender.report(),
        cpu_us,
        threads_us,
    }
}

async fn open(addr: SocketAddr, prefix: &str, rate: f64, seconds: u64) -> Report {
    let sender = sender(addr);
    let n = (rate * seconds as f64) as usize;
    let progress = sender.progress(prefix, n);
    sender.open_loop(bodies(prefix, n), rate).await;
    progress.finish().await;
    sender.report()
}

fn sender(addr: SocketAddr) -> Sender {
    Sender::new(
        Target {
            url: format!("http://{addr}/webhooks/coinflow"),
            key: KEY.into(),
            authorization: false,
            compress: 1000.0,
            attempts: 3,
        },
        None,
    )
}

/// Pre-loads `rows` settled payments, each with its event and grant, straight into the
/// ledger tables (what months of traffic would leave).
async fn preload(url: &str, rows: u64) -> anyhow::Result<()> {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await?;
    let body = "x'7b7d'"; // '{}'
    let (events, ledger) = if url.starts_with("sqlite") {
        (
            format!("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
             INSERT INTO events (event_key, event_type, category, created_raw, payment_id, wallet, outcome, received_at_us, recorded_at_us, raw_body)
             SELECT 'pre-' || i, 'Settled', 'Purchase', 'c', 'pre-' || i, 'w-' || (i % 50000), 'granted', 0, 0, {body} FROM n"),
            format!("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
             INSERT INTO ledger (payment_id, entry_no, kind, sku, quantity, wallet, item, catalog_version, event_key, actor, recorded_at_us)
             SELECT 'pre-' || i, 1, 'grant', 'sword', 1, 'w-' || (i % 50000), 'sword', 'v', 'pre-' || i, 'coinflow', 0 FROM n"),
        )
    } else {
        (
            format!("INSERT INTO events (event_key, event_type, category, created_raw, payment_id, wallet, outcome, received_at_us, recorded_at_us, raw_body)
             SELECT 'pre-' || i, 'Settled', 'Purchase', 'c', 'pre-' || i, 'w-' || (i % 50000), 'granted', 0, 0, '\\x7b7d'::bytea FROM generate_series(1, {rows}) i"),
            format!("INSERT INTO ledger (payment_id, entry_no, kind, sku, quantity, wallet, item, catalog_version, event_key, actor, recorded_at_us)
             SELECT 'pre-' || i, 1, 'grant', 'sword', 1, 'w-' || (i % 50000), 'sword', 'v', 'pre-' || i, 'coinflow', 0 FROM generate_series(1, {rows}) i"),
        )
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(events))
        .execute(&mut conn)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(ledger))
        .execute(&mut conn)
        .await?;
    if url.starts_with("sqlite") {
        sqlx::raw_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await?;
    } else {
        // Months of traffic leave PostgreSQL with statistics (autovacuum); a bulk load
        // does not until autovacuum's next pass, and without them the planner takes a
        // batch's `IN (...)` lookups for table scans.
        sqlx::raw_sql("ANALYZE; CHECKPOINT")
            .execute(&mut conn)
            .await?;
    }
    drop(conn);
    // The bulk load leaves hundreds of MiB of dirty pages; flushed now, their writeback
    // does not compete with the measurement that follows.
    std::process::Command::new("sync").status()?;
    Ok(())
}

struct Row {
    name: String,
    throughput: f64,
    p50: f64,
    p99: f64,
    rate_p50: Option<f64>,
    rate_p99: Option<f64>,
    rate_achieved: Option<f64>,
    rss: Vec<(String, f64)>,
    cpu_us: Vec<(&'static str, f64)>,
    threads_us: Vec<(&'static str, BTreeMap<String, f64>)>,
}

fn row(name: &str, closed: &Closed, rate: Option<&Report>, procs: &[&Proc]) -> Row {
    Row {
        name: name.to_owned(),
        throughput: closed.report.throughput_per_s,
        p50: closed.report.p50_ms,
        p99: closed.report.p99_ms,
        rate_p50: rate.map(|r| r.p50_ms),
        rate_p99: rate.map(|r| r.p99_ms),
        rate_achieved: rate.map(|r| r.throughput_per_s),
        rss: procs
            .iter()
            .map(|p| (p.name.to_owned(), p.peak_rss_mib()))
            .collect(),
        cpu_us: closed.cpu_us.clone(),
        threads_us: closed.threads_us.clone(),
    }
}

/// Where a pipeline's ledgers are made: each call to [`Ledgers::fresh`] is a new, empty
/// one (a file, or a database on the PostgreSQL server, dropped by [`Ledgers::drop_all`]).
enum Ledgers {
    Sqlite { dir: PathBuf, made: usize },
    Postgres { server: String, made: Vec<String> },
}

impl Ledgers {
    /// How many ledgers were made so far.
    fn count(&self) -> usize {
        match self {
            Self::Sqlite { made, .. } => *made,
            Self::Postgres { made, .. } => made.len(),
        }
    }

    async fn fresh(&mut self, tag: &str) -> anyhow::Result<String> {
        match self {
            Self::Sqlite { dir, made } => {
                *made += 1;
                Ok(format!(
                    "sqlite://{}",
                    dir.join(format!("{tag}.db")).display()
                ))
            }
            Self::Postgres { server, made } => {
                let name = format!("coinflow_bench_{}_{tag}", std::process::id());
                let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres")).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await?;
                made.push(name.clone());
                Ok(format!("{server}/{name}"))
            }
        }
    }

    async fn drop_all(&mut self) -> anyhow::Result<()> {
        if let Self::Postgres { server, made } = self {
            let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres")).await?;
            for name in made.drain(..) {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await?;
            }
        }
        Ok(())
    }
}

/// Starts the pipeline on the ledger at `url` and warms it up with 2,000 events named
/// after `tag`.
async fn warmed(url: &str, tag: &str, shape: Shape, cli: &Cli) -> anyhow::Result<Vec<Proc>> {
    let procs = stack(url, shape, cli).await?;
    warm(&refs(&procs), tag, cli).await;
    Ok(procs)
}

fn refs(procs: &[Proc]) -> Vec<&Proc> {
    procs.iter().collect()
}

/// A short closed loop, not measured: connections, caches and the ledger's first pages.
async fn warm(procs: &[&Proc], tag: &str, cli: &Cli) {
    closed(procs, &format!("{tag}-warm"), 2000, cli.concurrency).await;
}

/// One row of the report for `procs` (already warm; `procs[0]` takes the deliveries): a
/// closed loop of `cli.events` events, then an open loop at `cli.rate`.
async fn measure(name: &str, procs: &[&Proc], cli: &Cli) -> Row {
    eprintln!("{name}: closed loop");
    let c = closed(
        procs,
        &format!("{name}-closed"),
        cli.events,
        cli.concurrency,
    )
    .await;
    eprintln!("{name}: open loop at {}/s", cli.rate);
    let o = open(
        procs[0].addr,
        &format!("{name}-open"),
        cli.rate,
        cli.rate_seconds,
    )
    .await;
    row(name, &c, Some(&o), procs)
}

/// Starts the pipeline on the ledger at `url`, warms it up, and measures one closed loop
/// of `cli.events` events named after `tag`.
async fn closed_on(url: &str, tag: &str, cli: &Cli) -> anyhow::Result<Closed> {
    let procs = warmed(url, tag, Shape::WARN, cli).await?;
    Ok(closed(&refs(&procs), tag, cli.events, cli.concurrency).await)
}

/// The full-ledger comparison: closed loops alternating between a fresh ledger and the
/// pre-loaded one, the ratio of each round in percent.
async fn full_ledger(name: &str, ledgers: &mut Ledgers, cli: &Cli) -> anyhow::Result<Vec<f64>> {
    eprintln!("{name}: pre-loading {} ledger rows", cli.preload);
    let full = ledgers.fresh("full").await?;
    drop(stack(&full, Shape::WARN, cli).await?);
    preload(&full, cli.preload).await?;
    let mut ratios = Vec::with_capacity(cli.full_rounds);
    for i in 0..cli.full_rounds {
        eprintln!(
            "{name}: fresh and full ledgers, round {}/{}",
            i + 1,
            cli.full_rounds
        );
        let fresh = ledgers.fresh(&format!("round{i}")).await?;
        let tag = format!("{name}-round{i}");
        let empty = closed_on(&fresh, &tag, cli).await?.report.throughput_per_s;
        let loaded = closed_on(&full, &tag, cli).await?.report.throughput_per_s;
        ratios.push(100.0 * loaded / empty);
    }
    Ok(ratios)
}

/// A warm pipeline of `shape` on a fresh ledger, measured.
async fn pipeline(
    name: &str,
    ledgers: &mut Ledgers,
    shape: Shape,
    cli: &Cli,
) -> anyhow::Result<Row> {
    let url = ledgers.fresh(&format!("r{}", ledgers.count())).await?;
    eprintln!("{name}: warm-up");
    let procs = warmed(&url, name, shape, cli).await?;
    Ok(measure(name, &refs(&procs), cli).await)
}

/// The pipeline on a ledger created just now, measured from its first event: no warm-up.
async fn new_ledger(name: &str, ledgers: &mut Ledgers, cli: &Cli) -> anyhow::Result<Row> {
    let url = ledgers.fresh(&format!("r{}", ledgers.count())).await?;
    let procs = stack(&url, Shape::WARN, cli).await?;
    eprintln!("{name}: closed loop from the first event");
    let c = closed(&refs(&procs), name, cli.events, cli.concurrency).await;
    Ok(row(name, &c, None, &refs(&procs)))
}

/// Every row of one backend: warm at `warn`, at the default level, on a new ledger
/// without warm-up, with two replicas where the backend supports them; then the full
/// ledger's rounds.
async fn backend(
    label: &str,
    ledgers: &mut Ledgers,
    with_full: bool,
    cli: &Cli,
) -> anyhow::Result<(Vec<Row>, Vec<f64>)> {
    let info = Shape {
        log: Log::Default,
        replicas: 1,
    };
    let two = Shape {
        log: Log::Warn,
        replicas: 2,
    };
    // `None`: a new ledger, measured from its first event.
    let mut runs = vec![
        (format!("{label} pipeline"), Some(Shape::WARN)),
        (format!("{label}, default log level"), Some(info)),
        (format!("{label}, new ledger, no warm-up"), None),
    ];
    if matches!(ledgers, Ledgers::Postgres { .. }) {
        runs.push((format!("{label}, two fulfillment replicas"), Some(two)));
    }
    let mut rows = Vec::new();
    for (name, shape) in runs {
        if !cli.wants(&name) {
            continue;
        }
        rows.push(match shape {
            Some(shape) => pipeline(&name, ledgers, shape, cli).await?,
            None => new_ledger(&name, ledgers, cli).await?,
        });
    }
    let full = if with_full && cli.preload > 0 && cli.full_rounds > 0 && cli.only.is_none() {
        full_ledger(label, ledgers, cli).await?
    } else {
        Vec::new()
    };
    Ok((rows, full))
}

/// `cli.pairs` alternating closed-loop measurements of bare hyper and the SQLite pipeline
/// (a fresh ledger each time); the ratio of each pair, in percent.
async fn pairs(cli: &Cli, dir: &Path) -> anyhow::Result<Vec<f64>> {
    let mut ratios = Vec::with_capacity(cli.pairs);
    for i in 0..cli.pairs {
        eprintln!("pair {}/{}", i + 1, cli.pairs);
        let bare = start_bare().await?;
        warm(&[&bare], &format!("pair{i}-bare"), cli).await;
        let b = closed(
            &[&bare],
            &format!("pair{i}-bare"),
            cli.events,
            cli.concurrency,
        )
        .await;
        drop(bare);
        let url = format!("sqlite://{}", dir.join(format!("pair{i}.db")).display());
        let p = closed_on(&url, &format!("pair{i}"), cli).await?;
        ratios.push(100.0 * p.report.throughput_per_s / b.report.throughput_per_s);
    }
    Ok(ratios)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.bare_server {
        return bare_server().await;
    }
    if cli.stub_ingest {
        return stub_ingest().await;
    }
    if let Some(json) = &cli.chart_from {
        let svg = json.with_extension("svg");
        chart::write_svg(&chart::read_json(json)?, &svg)?;
        eprintln!("{}", svg.display());
        return Ok(());
    }
    let stem = match &cli.report {
        Some(stem) => stem.clone(),
        None => default_report()?,
    };
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let dir = std::env::temp_dir().join(format!("coinflow-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    let mut full = Vec::new();

    let bare = start_bare().await?;
    warm(&[&bare], "bare", &cli).await;
    rows.push(measure("bare hyper (ceiling)", &[&bare], &cli).await);
    drop(bare);

    let stub_row = "edge + gRPC to a stub that stores nothing";
    if cli.wants(stub_row) {
        let stub = start_internal("--stub-ingest", "ingest stub").await?;
        let edge = start_edge(&format!("http://{}", stub.addr), Log::Warn, &cli).await?;
        warm(&[&edge, &stub], "stub", &cli).await;
        rows.push(measure(stub_row, &[&edge, &stub], &cli).await);
    }

    let mut sqlite = Ledgers::Sqlite {
        dir: dir.clone(),
        made: 0,
    };
    let mut postgres = Ledgers::Postgres {
        server: cli.postgres.clone(),
        made: Vec::new(),
    };
    let mut rounds = Vec::with_capacity(cli.rounds);
    for round in 0..cli.rounds.max(1) {
        eprintln!("round {}/{}", round + 1, cli.rounds.max(1));
        let (mut measured, f) = backend("SQLite", &mut sqlite, round == 0, &cli).await?;
        if round == 0 {
            full.push(("SQLite", f));
        }
        if !cli.postgres.is_empty() {
            let result = backend("PostgreSQL", &mut postgres, round == 0, &cli).await;
            postgres.drop_all().await?;
            let (r, f) = result?;
            measured.extend(r);
            if round == 0 {
                full.push(("PostgreSQL", f));
            }
        }
        rounds.push(measured);
    }
    let table: Vec<&Row> = rows.iter().chain(&rounds[0]).collect();
    let ratios = pairs(&cli, &dir).await?;
    let _ = std::fs::remove_dir_all(&dir);

    let text = markdown(&cli, &table, &rounds, &full, &ratios);
    print!("{text}");
    save(&stem, &text, &chart_report(&cli, &table))
}

/// `bench/<UTC time>` in the target directory this binary was built into.
fn default_report() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("the target directory")?;
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    Ok(target.join("bench").join(stamp))
}

/// Writes `<stem>.md`, `<stem>.json` and `<stem>.svg` (`stem`'s directory exists).
fn save(stem: &Path, text: &str, report: &BenchReport) -> anyhow::Result<()> {
    let with = |ext: &str| {
        let mut path = stem.as_os_str().to_owned();
        path.push(format!(".{ext}"));
        PathBuf::from(path)
    };
    std::fs::write(with("md"), text)
        .with_context(|| format!("writing {}", with("md").display()))?;
    chart::write_json(report, &with("json"))?;
    chart::write_svg(report, &with("svg"))?;
    eprintln!("report: {0}.md, {0}.json, {0}.svg", stem.display());
    Ok(())
}

/// The table's rows as the chart's report.
fn chart_report(cli: &Cli, table: &[&Row]) -> BenchReport {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let rounds = if cli.rounds > 1 { ", first round" } else { "" };
    BenchReport {
        title: format!(
            "coinflow-bench {stamp}: {} events per closed loop{rounds}",
            cli.events
        ),
        concurrency: cli.concurrency,
        rate: cli.rate,
        rows: table
            .iter()
            .map(|r| BenchRow {
                name: r.name.clone(),
                throughput_per_s: r.throughput,
                closed_p50_ms: r.p50,
                closed_p99_ms: r.p99,
                open_achieved_per_s: r.rate_achieved,
                open_p50_ms: r.rate_p50,
                open_p99_ms: r.rate_p99,
                peak_rss_mib: r
                    .rss
                    .iter()
                    .map(|(process, mib)| Rss {
                        process: process.clone(),
                        mib: *mib,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The report printed and written as `<report>.md`: the table, CPU per event, the ratios.
fn markdown(
    cli: &Cli,
    table: &[&Row],
    rounds: &[Vec<Row>],
    full: &[(&str, Vec<f64>)],
    pairs: &[f64],
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let bare_tp = table.first().map_or(0.0, |r| r.throughput);
    let _ = writeln!(
        out,
        "| run | events/s @{} | vs bare | p50 ms | p99 ms | @{}/s achieved | p50 ms | p99 ms | peak RSS MiB |",
        cli.concurrency, cli.rate
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for r in table {
        let rss: Vec<String> = r.rss.iter().map(|(n, m)| format!("{n} {m:.1}")).collect();
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.1}% | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {} |",
            r.name,
            r.throughput,
            100.0 * r.throughput / bare_tp,
            r.p50,
            r.p99,
            r.rate_achieved.unwrap_or(0.0),
            r.rate_p50.unwrap_or(0.0),
            r.rate_p99.unwrap_or(0.0),
            rss.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "\nCPU time per event in the closed loop, µs (user + system; 2 cores give 2,000,000 µs/s):\n"
    );
    for r in table {
        let cpu: Vec<String> = r
            .cpu_us
            .iter()
            .map(|(n, us)| format!("{n} {us:.0}"))
            .collect();
        let total: f64 = r.cpu_us.iter().map(|(_, us)| us).sum();
        let _ = writeln!(out, "- {}: {} (total {total:.0})", r.name, cpu.join(", "));
        for (process, threads) in &r.threads_us {
            let threads: Vec<String> = threads
                .iter()
                .filter(|(_, us)| **us >= 0.5)
                .map(|(n, us)| format!("{n} {us:.0}"))
                .collect();
            let _ = writeln!(out, "  - {process} by thread: {}", threads.join(", "));
        }
    }
    let _ = writeln!(out, "\n{}", targets(rounds));
    for (name, ratios) in full {
        if !ratios.is_empty() {
            let _ = writeln!(
                out,
                "\n{name} with {} rows pre-loaded vs a fresh ledger over {} alternating rounds: {}",
                cli.preload,
                ratios.len(),
                summary(ratios)
            );
        }
    }
    if !pairs.is_empty() {
        let _ = writeln!(
            out,
            "\nSQLite pipeline / bare hyper over {} alternating pairs: {}",
            pairs.len(),
            summary(pairs)
        );
    }
    out
}

/// The ratios BENCHMARKS.md's targets are stated in: each round's, then their median.
fn targets(rounds: &[Vec<Row>]) -> String {
    let mut lines = vec![
        format!("Ratios over {} round(s):", rounds.len()),
        String::new(),
    ];
    for (what, of, to) in [
        (
            "PostgreSQL / SQLite pipeline",
            "PostgreSQL pipeline",
            "SQLite pipeline",
        ),
        (
            "SQLite: default log level / warn",
            "SQLite, default log level",
            "SQLite pipeline",
        ),
        (
            "PostgreSQL: default log level / warn",
            "PostgreSQL, default log level",
            "PostgreSQL pipeline",
        ),
        (
            "SQLite: new ledger without warm-up / warm",
            "SQLite, new ledger, no warm-up",
            "SQLite pipeline",
        ),
        (
            "PostgreSQL: new ledger without warm-up / warm",
            "PostgreSQL, new ledger, no warm-up",
            "PostgreSQL pipeline",
        ),
        (
            "PostgreSQL: two fulfillment replicas / one",
            "PostgreSQL, two fulfillment replicas",
            "PostgreSQL pipeline",
        ),
    ] {
        let mut ratios = Vec::new();
        let mut p99s = Vec::new();
        for rows in rounds {
            let find = |name: &str| rows.iter().find(|r| r.name == name);
            if let (Some(a), Some(b)) = (find(of), find(to)) {
                ratios.push(100.0 * a.throughput / b.throughput);
                p99s.push(a.p99);
            }
        }
        if !ratios.is_empty() {
            let p99: Vec<String> = p99s.iter().map(|p| format!("{p:.2}")).collect();
            lines.push(format!(
                "- {what}: {}; its p99 each round, ms: {}",
                summary(&ratios),
                p99.join(", ")
            ));
        }
    }
    lines.join("\n")
}

/// "median M% (min A%, max B%): each%, ..." of percentages.
fn summary(ratios: &[f64]) -> String {
    let mut sorted = ratios.to_vec();
    sorted.sort_by(f64::total_cmp);
    let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.1}%")).collect();
    format!(
        "median {:.1}% (min {:.1}%, max {:.1}%): {}",
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1],
        shown.join(", ")
    )
}
