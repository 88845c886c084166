//! The provisioner's own record of volumes it created but has not yet handed
//! to a PersistentVolume.
//!
//! An intent is written before CreateVolume and removed once the PV exists.
//! An intent that outlives its grace period with no PV and no claim waiting
//! for it marks a leaked volume (the agent died between CreateVolume and the
//! PV, and the claim went away meanwhile): only such volumes are reclaimed.
//! Volumes that once had a PV are never touched by the reaper, so a retained
//! volume whose PV was deleted by hand keeps its data.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub volume: String,
    /// `namespace/name` of the claim.
    pub claim: String,
    pub claim_uid: String,
    /// Seconds since the epoch when the intent was first recorded.
    pub since: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("provisioner state {path}: {source}")]
pub struct LedgerError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

#[derive(Debug, Clone)]
pub struct Ledger {
    dir: PathBuf,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Ledger {
    pub fn open(state_dir: &Path) -> Result<Self, LedgerError> {
        let dir = state_dir.join("provisioning");
        fs::create_dir_all(&dir).map_err(|source| LedgerError {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    fn path(&self, volume: &str) -> PathBuf {
        // Volume names come from `pvc-<uid>`: no separators, but be strict.
        let safe: String = volume
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{safe}.json"))
    }

    /// Records the intent unless one exists already (keeps the first time).
    pub fn record(&self, volume: &str, claim: &str, claim_uid: &str) -> Result<(), LedgerError> {
        let path = self.path(volume);
        if path.exists() {
            return Ok(());
        }
        let intent = Intent {
            volume: volume.to_string(),
            claim: claim.to_string(),
            claim_uid: claim_uid.to_string(),
            since: now(),
        };
        let err = |source| LedgerError {
            path: path.clone(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec(&intent).map_err(|e| err(io::Error::other(e)))?;
        let mut f = fs::File::create(&tmp).map_err(err)?;
        f.write_all(&body).map_err(err)?;
        f.sync_all().map_err(err)?;
        fs::rename(&tmp, &path).map_err(err)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)
    }

    pub fn remove(&self, volume: &str) -> Result<(), LedgerError> {
        let path = self.path(volume);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(LedgerError { path, source: e }),
            _ => Ok(()),
        }
    }

    /// Intents older than `grace`. Unreadable entries are skipped (and
    /// reported by the caller's log), never treated as leaks.
    pub fn older_than(&self, grace: Duration) -> Result<Vec<Intent>, LedgerError> {
        let err = |source| LedgerError {
            path: self.dir.clone(),
            source,
        };
        let cutoff = now().saturating_sub(grace.as_secs());
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(err)? {
            let path = entry.map_err(err)?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Ok(intent) = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Intent>(&b).map_err(|e| e.to_string()))
            else {
                tracing::warn!(path = %path.display(), "unreadable provisioning intent, left alone");
                continue;
            };
            if intent.since <= cutoff {
                out.push(intent);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_survives_reopen_and_keeps_its_first_time() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.record("pvc-1", "db/a", "1").unwrap();
        let first = ledger.older_than(Duration::ZERO).unwrap();
        ledger.record("pvc-1", "db/a", "1").unwrap();
        let reopened = Ledger::open(dir.path()).unwrap();
        assert_eq!(reopened.older_than(Duration::ZERO).unwrap(), first);
        assert!(
            reopened
                .older_than(Duration::from_secs(3600))
                .unwrap()
                .is_empty()
        );
        reopened.remove("pvc-1").unwrap();
        reopened.remove("pvc-1").unwrap();
        assert!(reopened.older_than(Duration::ZERO).unwrap().is_empty());
    }
}
