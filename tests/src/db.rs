//! A fresh database per test: a temp SQLite file by default, or a randomly named
//! PostgreSQL database (created, migrated by the service, dropped afterwards) when
//! `COINFLOW_TEST_BACKEND=postgres`. `COINFLOW_TEST_PG_URL` names the server (default
//! `postgres://postgres@127.0.0.1:5432`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::Connection;

/// The backends a test run can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A temp file.
    Sqlite,
    /// A database on the PostgreSQL server.
    Postgres,
}

/// The backend this run uses, from `COINFLOW_TEST_BACKEND`: `sqlite` (the default, also
/// when unset or empty) or `postgres`. Any other value panics: a misspelt backend must not
/// quietly run the suite on SQLite.
pub fn backend() -> Backend {
    let value = std::env::var_os("COINFLOW_TEST_BACKEND");
    let value = value.as_deref().map(|v| {
        v.to_str()
            .unwrap_or_else(|| panic!("COINFLOW_TEST_BACKEND is not UTF-8: {v:?}"))
    });
    parse_backend(value).unwrap_or_else(|e| panic!("{e}"))
}

/// `COINFLOW_TEST_BACKEND`'s value as a backend, or why it is none.
pub fn parse_backend(value: Option<&str>) -> Result<Backend, String> {
    match value {
        None | Some("" | "sqlite") => Ok(Backend::Sqlite),
        Some("postgres") => Ok(Backend::Postgres),
        Some(other) => Err(format!(
            "COINFLOW_TEST_BACKEND={other:?} is not a backend: use \"sqlite\" (the default) or \"postgres\""
        )),
    }
}

/// The PostgreSQL server tests use.
pub fn pg_server() -> String {
    std::env::var("COINFLOW_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// One test's database; dropped with it.
pub struct TestDb {
    /// The URL to hand the service.
    pub url: String,
    /// Which backend.
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    /// A database on this run's backend.
    pub async fn new() -> Self {
        match backend() {
            Backend::Sqlite => Self::sqlite(),
            Backend::Postgres => Self::postgres().await,
        }
    }

    /// A temp SQLite file.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        Self {
            url,
            backend: Backend::Sqlite,
            _dir: Some(dir),
            pg_name: None,
        }
    }

    /// A SQLite ledger at `dir/ledger.db` (a directory the caller owns, e.g. a mount).
    pub fn sqlite_in(dir: &std::path::Path) -> Self {
        Self {
            url: format!("sqlite://{}", dir.join("ledger.db").display()),
            backend: Backend::Sqlite,
            _dir: None,
            pg_name: None,
        }
    }

    /// A new, empty PostgreSQL database with a random name.
    pub async fn postgres() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "coinflow_test_{}_{nanos}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let server = pg_server();
        let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {server} is not reachable: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        Self {
            url: format!("{server}/{name}"),
            backend: Backend::Postgres,
            _dir: None,
            pg_name: Some(name),
        }
    }

    /// The stored outcome and held reason of the event `event_key`, when it is recorded.
    pub async fn event_outcome(&self, event_key: &str) -> Option<(String, Option<String>)> {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&self.url).await.unwrap();
        sqlx::query_as("SELECT outcome, held_reason FROM events WHERE event_key = $1")
            .bind(event_key)
            .fetch_optional(&mut conn)
            .await
            .unwrap()
    }

    /// Extra flags the service needs for this database.
    pub fn flags(&self) -> &'static [&'static str] {
        match self.backend {
            Backend::Sqlite => &[],
            Backend::Postgres => &["--migrate-on-start"],
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        let server = pg_server();
        // Drop runs outside async code: use a private runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut admin) =
                    sqlx::PgConnection::connect(&format!("{server}/postgres")).await
                {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                }
            });
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_backends_are_accepted() {
        assert_eq!(parse_backend(None), Ok(Backend::Sqlite));
        assert_eq!(parse_backend(Some("")), Ok(Backend::Sqlite));
        assert_eq!(parse_backend(Some("sqlite")), Ok(Backend::Sqlite));
        assert_eq!(parse_backend(Some("postgres")), Ok(Backend::Postgres));
        for typo in ["postgresql", "Postgres", "pg", "sqlite3", " postgres"] {
            let e = parse_backend(Some(typo)).unwrap_err();
            assert!(
                e.contains("\"sqlite\"") && e.contains("\"postgres\""),
                "{e}"
            );
        }
    }
}
