//! The catalog: what each `webhookInfo` item grants and what it costs.
//!
//! ```toml
//! # Which key of webhookInfo names the entry.
//! item_key = "item"
//! # Recorded on every grant. Defaults to a hash of the file.
//! version = "2026-11-28"
//!
//! [items.sword]
//! price = { cents = 500, currency = "USD" }
//! grants = [{ sku = "sword", quantity = 1 }]
//!
//! # Skus game servers may spend through `Consume` (currencies).
//! [skus.credits]
//! consumable = true
//! ```
//!
//! Prices come from here, never from the webhook. [`CatalogHandle`] holds the live catalog
//! and swaps in a new file on SIGHUP or when it changes, keeping the old one when the new
//! one is invalid.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// A validated catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    /// The `webhookInfo` key whose string value names the entry.
    pub item_key: String,
    /// Recorded on each grant this catalog prices.
    pub version: String,
    /// Entries by name.
    pub items: BTreeMap<String, Item>,
    /// Sku properties, by sku.
    pub skus: BTreeMap<String, Sku>,
}

/// What a sku is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sku {
    /// A currency-like sku that game servers spend with `Consume`. After a chargeback its
    /// balance can go negative: debt.
    #[serde(default)]
    pub consumable: bool,
}

/// One sellable entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// The least the payer's `subtotal` must be.
    pub price: Price,
    /// What one purchase grants: one or more skus (a bundle).
    pub grants: Vec<Grant>,
}

/// A catalog price.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Minor units.
    pub cents: i64,
    /// ISO 4217, upper case.
    pub currency: String,
}

/// A sku and how many of it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The sku the merchant's game or app understands.
    pub sku: String,
    /// How many; positive.
    pub quantity: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    item_key: String,
    version: Option<String>,
    #[serde(default)]
    items: BTreeMap<String, Item>,
    #[serde(default)]
    skus: BTreeMap<String, Sku>,
}

/// Why a catalog was refused. Each message names the file and the entry.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The file could not be read.
    #[error("catalog {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML, or not the catalog's shape.
    #[error("catalog {path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// What the TOML parser said, with the line.
        message: String,
    },
    /// Well-formed but wrong.
    #[error("catalog {path}: {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, naming the entry.
        problem: String,
    },
}

impl Catalog {
    /// Reads and validates a catalog file.
    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    /// Parses and validates catalog text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, CatalogError> {
        let file: File = toml::from_str(text).map_err(|e| CatalogError::Syntax {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |problem: String| CatalogError::Invalid {
            path: origin.to_owned(),
            problem,
        };
        if file.item_key.trim().is_empty() {
            return Err(invalid("item_key must not be empty".into()));
        }
        if file.items.is_empty() {
            return Err(invalid("no [items.<name>] entries".into()));
        }
        for (name, item) in &file.items {
            validate_item(item).map_err(|p| invalid(format!("items.{name}: {p}")))?;
        }
        let version = match file.version {
            Some(v) if !v.trim().is_empty() => v,
            Some(_) => return Err(invalid("version must not be empty when set".into())),
            None => format!(
                "sha256:{}",
                &hex::encode(Sha256::digest(text.as_bytes()))[..16]
            ),
        };
        if let Some(name) = file.skus.keys().find(|s| s.trim().is_empty()) {
            return Err(invalid(format!(
                "skus.{name:?}: a sku name must not be empty"
            )));
        }
        Ok(Self {
            item_key: file.item_key,
            version,
            items: file.items,
            skus: file.skus,
        })
    }

    /// Whether `sku` may be consumed.
    pub fn is_consumable(&self, sku: &str) -> bool {
        self.skus.get(sku).is_some_and(|s| s.consumable)
    }
}

/// The live catalog, swapped atomically on reload. Readers take an `Arc` and keep a
/// consistent catalog for the whole request.
#[derive(Debug)]
pub struct CatalogHandle {
    path: PathBuf,
    current: RwLock<(Arc<Catalog>, String)>,
}

impl CatalogHandle {
    /// Loads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let text = read(path)?;
        let catalog = Catalog::parse(&text, &path.display().to_string())?;
        Ok(Self {
            path: path.to_owned(),
            current: RwLock::new((Arc::new(catalog), text)),
        })
    }

    /// The catalog now.
    pub fn current(&self) -> Arc<Catalog> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()).0)
    }

    /// Re-reads the file. `Ok(true)` when a new catalog was swapped in, `Ok(false)` when
    /// the file is unchanged; on error the old catalog stays.
    pub fn reload(&self) -> Result<bool, CatalogError> {
        let text = read(&self.path)?;
        if self.current.read().unwrap_or_else(|p| p.into_inner()).1 == text {
            return Ok(false);
        }
        let catalog = Catalog::parse(&text, &self.path.display().to_string())?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(catalog), text);
        Ok(true)
    }

    /// Reloads on SIGHUP and whenever the file's content changes (checked every
    /// `interval`; this also follows Kubernetes ConfigMap symlink swaps), until `shutdown`.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = hangup => tracing::info!("SIGHUP: reloading the catalog"),
                () = tokio::time::sleep(interval) => {}
            }
            match self.reload() {
                Ok(true) => {
                    let c = self.current();
                    tracing::info!(version = %c.version, items = c.items.len(), "catalog reloaded");
                }
                Ok(false) => {}
                Err(e) => tracing::error!(
                    error = %e,
                    "catalog reload failed; keeping the previous catalog"
                ),
            }
        }
    }
}

fn read(path: &Path) -> Result<String, CatalogError> {
    std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn validate_item(item: &Item) -> Result<(), String> {
    if item.price.cents <= 0 {
        return Err(format!(
            "price.cents must be positive, got {}",
            item.price.cents
        ));
    }
    let c = &item.price.currency;
    if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "price.currency must be an upper-case ISO 4217 code, got {c:?}"
        ));
    }
    if item.grants.is_empty() {
        return Err("grants must list at least one sku".into());
    }
    let mut seen = HashSet::new();
    for g in &item.grants {
        if g.sku.trim().is_empty() {
            return Err("a grant has an empty sku".into());
        }
        if g.quantity <= 0 {
            return Err(format!(
                "grant {:?}: quantity must be positive, got {}",
                g.sku, g.quantity
            ));
        }
        if !seen.insert(&g.sku) {
            return Err(format!("grant {:?} appears twice", g.sku));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        item_key = "item"
        version = "v1"
        [items.sword]
        price = { cents = 500, currency = "USD" }
        grants = [{ sku = "sword", quantity = 1 }]
        [items.starter-bundle]
        price = { cents = 1500, currency = "USD" }
        grants = [{ sku = "sword", quantity = 1 }, { sku = "credits", quantity = 500 }]
    "#;

    #[test]
    fn parses_the_example_in_the_repo() {
        let c = Catalog::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/base/catalog.example.toml"
        )))
        .unwrap();
        assert_eq!(c.item_key, "item");
        assert!(c.items.contains_key("sword"));
        assert!(c.items.contains_key("credits-1000"));
        assert!(c.is_consumable("credits"));
        assert!(!c.is_consumable("sword"));
    }

    #[test]
    fn reload_swaps_valid_files_and_keeps_the_old_one_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.toml");
        std::fs::write(&path, GOOD).unwrap();
        let handle = CatalogHandle::load(&path).unwrap();
        assert!(!handle.reload().unwrap(), "unchanged file");
        std::fs::write(&path, GOOD.replace("cents = 500", "cents = 400")).unwrap();
        assert!(handle.reload().unwrap());
        assert_eq!(handle.current().items["sword"].price.cents, 400);
        std::fs::write(&path, GOOD.replace("cents = 500", "cents = -1")).unwrap();
        let err = handle.reload().unwrap_err().to_string();
        assert!(err.contains("items.sword"), "{err}");
        assert_eq!(
            handle.current().items["sword"].price.cents,
            400,
            "the old catalog stays"
        );
    }

    #[test]
    fn parses_bundles_and_keeps_the_version() {
        let c = Catalog::parse(GOOD, "t").unwrap();
        assert_eq!(c.version, "v1");
        assert_eq!(c.items["starter-bundle"].grants.len(), 2);
    }

    #[test]
    fn version_defaults_to_a_content_hash() {
        let c = Catalog::parse(&GOOD.replace("version = \"v1\"", ""), "t").unwrap();
        assert!(c.version.starts_with("sha256:"));
    }

    #[test]
    fn errors_name_the_entry() {
        for (bad, needle) in [
            (
                GOOD.replace("cents = 500", "cents = 0"),
                "items.sword: price.cents",
            ),
            (
                GOOD.replace(
                    "currency = \"USD\" }\n        grants = [{ sku = \"sword\", quantity = 1 }]",
                    "currency = \"usd\" }\n        grants = [{ sku = \"sword\", quantity = 1 }]",
                ),
                "items.sword: price.currency",
            ),
            (
                GOOD.replace("quantity = 500", "quantity = -5"),
                "items.starter-bundle: grant \"credits\"",
            ),
            (
                GOOD.replace(
                    "{ sku = \"credits\", quantity = 500 }",
                    "{ sku = \"sword\", quantity = 2 }",
                ),
                "appears twice",
            ),
            (
                GOOD.replace(
                    "grants = [{ sku = \"sword\", quantity = 1 }]\n",
                    "grants = []\n",
                ),
                "items.sword: grants",
            ),
            (
                GOOD.replace("item_key = \"item\"", "item_key = \"\""),
                "item_key",
            ),
            (GOOD.replace("price = {", "prize = {"), "unknown field"),
            ("item_key = [".to_owned(), "catalog t:"),
        ] {
            let err = Catalog::parse(&bad, "t").unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should contain {needle:?}");
        }
    }
}
