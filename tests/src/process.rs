//! The real binaries as child processes, for tests that `kill -9` them and read their
//! logs. The binaries are the ones cargo built beside this test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// A workspace binary built by this `cargo test` / `cargo nextest` run.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace)",
        path.display()
    );
    path
}

/// A running service process with its captured log lines.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// The address it logged as listening on.
    pub addr: SocketAddr,
    /// Its admin address (`/healthz`, `/readyz`, `/metrics`), from the same log line.
    pub admin: SocketAddr,
    /// Every line it wrote to stderr so far.
    pub logs: Arc<Mutex<Vec<String>>>,
    read: usize,
}

impl Proc {
    /// Starts `bin` with `args` and `env`, waiting for the log line carrying `field` (the
    /// listen address) to learn where it listens.
    pub async fn start(bin_name: &str, args: &[&str], env: &[(&str, &str)], field: &str) -> Self {
        let mut cmd = Command::new(bin(bin_name));
        cmd.args(args)
            .env_remove("RUST_LOG")
            .env("LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = oneshot::channel();
        let (lines, field) = (Arc::clone(&logs), field.to_owned());
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let (Some(addr), Some(admin)) =
                        (v["fields"][&field].as_str(), v["fields"]["admin"].as_str())
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send((addr.parse::<SocketAddr>().unwrap(), admin.parse().unwrap()));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let (addr, admin) = tokio::time::timeout(std::time::Duration::from_secs(30), rx)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{bin_name} did not log its address; logs: {:?}",
                    logs.lock().unwrap()
                )
            })
            .unwrap_or_else(|_| {
                panic!("{bin_name} exited early; logs: {:?}", logs.lock().unwrap())
            });
        Self {
            child,
            addr,
            admin,
            logs,
            read: 0,
        }
    }

    /// fulfillment-svc over `db`, on free ports.
    pub async fn fulfillment(db: &crate::TestDb) -> Self {
        Self::fulfillment_env(db, &[]).await
    }

    /// fulfillment-svc over `db` with extra environment (`FULFILLMENT_LISTEN` in `env`
    /// picks the port, e.g. to restart on the same one).
    pub async fn fulfillment_env(db: &crate::TestDb, env: &[(&str, &str)]) -> Self {
        Self::fulfillment_with(db, &crate::catalog_path(), env).await
    }

    /// fulfillment-svc over `db` with the catalog file `catalog` and extra environment.
    pub async fn fulfillment_with(
        db: &crate::TestDb,
        catalog: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let url = db.url.as_str();
        Self::start(
            "fulfillment-svc",
            &[
                &[
                    "--database-url",
                    url,
                    "--catalog",
                    catalog.to_str().unwrap(),
                ],
                db.flags(),
            ]
            .concat(),
            &[
                &[
                    ("FULFILLMENT_LISTEN", "127.0.0.1:0"),
                    ("FULFILLMENT_ADMIN_LISTEN", "127.0.0.1:0"),
                    ("FULFILLMENT_API_TOKENS", crate::API_TOKEN),
                    ("FULFILLMENT_INGEST_TOKENS", crate::INGEST_TOKEN),
                    ("FULFILLMENT_OPERATOR_TOKENS", "tester:test-operator-token"),
                ],
                env,
            ]
            .concat(),
            "addr",
        )
        .await
    }

    /// webhook-edge in front of the ingest at `fulfillment`, trusting `keys`, on free ports
    /// (`EDGE_LISTEN` in `env` picks the port, e.g. to restart on the same one).
    pub async fn edge(fulfillment: SocketAddr, keys: &str, env: &[(&str, &str)]) -> Self {
        Self::edge_to(&format!("http://{fulfillment}"), keys, env).await
    }

    /// webhook-edge in front of the ingest `endpoints` (`--fulfillment-url` syntax).
    pub async fn edge_to(endpoints: &str, keys: &str, env: &[(&str, &str)]) -> Self {
        let url = endpoints;
        let mut all_env = vec![
            ("EDGE_LISTEN", "127.0.0.1:0"),
            ("EDGE_ADMIN_LISTEN", "127.0.0.1:0"),
            ("COINFLOW_WEBHOOK_KEYS", keys),
            ("EDGE_INGEST_TOKEN", crate::INGEST_TOKEN),
        ];
        all_env.extend_from_slice(env);
        Self::start(
            "webhook-edge",
            &["--fulfillment-url", url],
            &all_env,
            "addr",
        )
        .await
    }

    /// `kill -9`, and wait for it to be gone.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.child.wait().await.unwrap()
    }

    /// Sends a signal (`HUP`, `TERM`…) to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().unwrap();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits (up to 30 s) for a log line containing `needle` that was not matched before,
    /// and returns it.
    pub async fn wait_for_log(&mut self, needle: &str) -> String {
        for _ in 0..600 {
            {
                let lines = self.logs.lock().unwrap();
                if let Some(i) = lines
                    .iter()
                    .skip(self.read)
                    .position(|l| l.contains(needle))
                {
                    self.read += i + 1;
                    return lines[self.read - 1].clone();
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("no log line contains {needle:?}: {}", self.log_text());
    }

    /// All log lines so far, joined.
    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}
