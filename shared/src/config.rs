//! Config helpers shared by both services: log format, and secrets that cannot be
//! printed. Each service's own config is a clap struct read from flags and environment.

use secrecy::SecretString;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise (containers).
    #[default]
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Human,
}

/// Parses a comma-separated list of secrets (keys or tokens), for clap and env vars.
/// Whitespace around entries is dropped; empty entries are ignored.
pub fn parse_secret_list(s: &str) -> Result<SecretList, String> {
    Ok(SecretList(
        s.split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(SecretString::from)
            .collect(),
    ))
}

/// Several secrets at once (key rotation). `Debug` never shows them.
#[derive(Clone, Default)]
pub struct SecretList(pub Vec<SecretString>);

impl std::fmt::Debug for SecretList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} redacted]", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn secret_lists_parse_and_never_print() {
        let list = parse_secret_list(" k1, ,k2 ").unwrap();
        let exposed: Vec<_> = list
            .0
            .iter()
            .map(|k| k.expose_secret().to_owned())
            .collect();
        assert_eq!(exposed, ["k1", "k2"]);
        let shown = format!("{list:?}");
        assert!(!shown.contains("k1") && !shown.contains("k2"), "{shown}");
    }
}
