//! `ingest-gateway nkey …`: the NATS identities of the pipeline.
//!
//! An nkey is an Ed25519 key pair. The server's configuration holds only the public key
//! (`U…`); the service holds the seed (`SU…`) in a file and proves it by signing the
//! server's nonce, so the secret never crosses the network, even without TLS. Chosen
//! over passwords (sent to the server on every connect) and over JWT accounts (an
//! operator, account and resolver to run) — see SECURITY.md.

use std::io::Write;
use std::path::Path;

use anyhow::Context as _;

/// Creates a user nkey, writes its seed to `path` (mode 0600, never overwriting) and
/// prints the public key.
///
/// # Errors
/// The file exists or cannot be written.
pub fn create(path: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().context("encoding the seed")?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).with_context(|| {
        format!(
            "creating {} (an existing file is never overwritten)",
            path.display()
        )
    })?;
    writeln!(file, "{seed}").with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()?;
    writeln!(out, "{}", pair.public_key())?;
    Ok(())
}

/// Prints the public key of the seed in `path`.
///
/// # Errors
/// The file cannot be read or holds no user seed.
pub fn public(path: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let seed = callcap::config::read_seed(path)?;
    let pair = nkeys::KeyPair::from_seed(&seed)
        .map_err(|e| anyhow::anyhow!("{} holds no valid seed: {e}", path.display()))?;
    writeln!(out, "{}", pair.public_key())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_seed_is_private_and_gives_back_its_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.nk");
        let mut printed = Vec::new();
        create(&path, &mut printed).unwrap();
        let public_key = String::from_utf8(printed).unwrap();
        assert!(public_key.starts_with('U'), "{public_key}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let mut again = Vec::new();
        public(&path, &mut again).unwrap();
        assert_eq!(String::from_utf8(again).unwrap(), public_key);
        // Never overwritten: the running service's identity must not change under it.
        assert!(create(&path, &mut Vec::new()).is_err());
    }
}
