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

/// The folder of the provisioning intents, under the state dir.
pub const PROVISIONING: &str = "provisioning";
/// The folder of the marks of volumes whose class releases them on node
/// loss (see `nodeloss`): written with the intent, before CreateVolume, and
/// kept for the volume's life; what lets a node that comes back find the
/// volumes whose PV the node-loss leader deleted.
pub const NODE_LOSS: &str = "node-loss";

impl Ledger {
    pub fn open(state_dir: &Path) -> Result<Self, LedgerError> {
        Self::open_named(state_dir, PROVISIONING)
    }

    /// A ledger in folder `name` of the state dir.
    pub fn open_named(state_dir: &Path, name: &str) -> Result<Self, LedgerError> {
        let dir = state_dir.join(name);
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

    /// Whether an intent for `volume` stands.
    pub fn contains(&self, volume: &str) -> Result<bool, LedgerError> {
        let path = self.path(volume);
        path.try_exists()
            .map_err(|source| LedgerError { path, source })
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

/// The ledger for async callers. Its writes fsync a file, rename it and
/// fsync the folder: each can take milliseconds (or, on a stalled disk,
/// seconds), and the agent's runtime threads also serve kubelet's gRPC. So
/// every file operation runs on tokio's blocking pool, never on the runtime
/// thread that awaits it. Cheap to clone: one per task that needs it.
#[derive(Debug, Clone)]
pub struct AsyncLedger {
    ledger: Ledger,
}

impl AsyncLedger {
    /// Opens (creates) `<state_dir>/provisioning` off the runtime.
    pub async fn open(state_dir: &Path) -> Result<Self, LedgerError> {
        Self::open_named(state_dir, PROVISIONING).await
    }

    /// Opens (creates) `<state_dir>/<name>` off the runtime.
    pub async fn open_named(state_dir: &Path, name: &'static str) -> Result<Self, LedgerError> {
        let dir = state_dir.to_path_buf();
        let ledger = blocking(state_dir.join(name), move || Ledger::open_named(&dir, name)).await?;
        Ok(Self { ledger })
    }

    /// See [`Ledger::record`].
    pub async fn record(
        &self,
        volume: &str,
        claim: &str,
        claim_uid: &str,
    ) -> Result<(), LedgerError> {
        let ledger = self.ledger.clone();
        let (volume, claim, claim_uid) =
            (volume.to_string(), claim.to_string(), claim_uid.to_string());
        blocking(self.ledger.path(&volume), move || {
            ledger.record(&volume, &claim, &claim_uid)
        })
        .await
    }

    /// See [`Ledger::contains`].
    pub async fn contains(&self, volume: &str) -> Result<bool, LedgerError> {
        let ledger = self.ledger.clone();
        let volume = volume.to_string();
        blocking(self.ledger.path(&volume), move || ledger.contains(&volume)).await
    }

    /// See [`Ledger::remove`].
    pub async fn remove(&self, volume: &str) -> Result<(), LedgerError> {
        let ledger = self.ledger.clone();
        let volume = volume.to_string();
        blocking(self.ledger.path(&volume), move || ledger.remove(&volume)).await
    }

    /// See [`Ledger::older_than`].
    pub async fn older_than(&self, grace: Duration) -> Result<Vec<Intent>, LedgerError> {
        let ledger = self.ledger.clone();
        blocking(self.ledger.dir.clone(), move || ledger.older_than(grace)).await
    }
}

/// Runs `f` on the blocking pool; a task that could not finish (a panic, or
/// the runtime shutting down) is an error of `path`.
async fn blocking<T: Send + 'static>(
    path: PathBuf,
    f: impl FnOnce() -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, LedgerError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(LedgerError {
            path,
            source: io::Error::other(format!("ledger task did not finish: {e}")),
        })
    })
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

    #[tokio::test]
    async fn async_ledger_records_reads_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = AsyncLedger::open(dir.path()).await.unwrap();
        ledger.record("pvc-1", "db/a", "1").await.unwrap();
        let intents = ledger.older_than(Duration::ZERO).await.unwrap();
        assert_eq!(intents.len(), 1);
        assert_eq!(intents[0].claim, "db/a");
        // The sync ledger (used by tools and the cluster suite) sees it.
        assert_eq!(
            Ledger::open(dir.path())
                .unwrap()
                .older_than(Duration::ZERO)
                .unwrap(),
            intents
        );
        ledger.remove("pvc-1").await.unwrap();
        assert!(ledger.older_than(Duration::ZERO).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn async_ledger_open_under_a_regular_file_fails_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let err = AsyncLedger::open(&file.join("state")).await.unwrap_err();
        assert_eq!(err.path, file.join("state/provisioning"));
    }

    /// A ledger write stuck in the filesystem (here: its temp file is a FIFO
    /// nobody reads, so opening it blocks until a reader comes) leaves the
    /// runtime's only thread free: another task runs meanwhile, and the
    /// write finishes once the filesystem lets it. Were the write done on the
    /// runtime thread, the runtime would stall, which the watchdog reports.
    #[test]
    fn a_stuck_ledger_write_does_not_stall_a_current_thread_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().to_path_buf();
        let (done, finished) = std::sync::mpsc::channel();
        let runner = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let ledger = AsyncLedger::open(&state).await.unwrap();
                let tmp = state.join("provisioning/pvc-1.json.tmp");
                nix::unistd::mkfifo(&tmp, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();

                let write = tokio::spawn({
                    let ledger = ledger.clone();
                    async move { ledger.record("pvc-1", "db/a", "uid-1").await }
                });
                let (beat, heard) = tokio::sync::oneshot::channel();
                // Spawned after the write, so polled after it on this thread.
                tokio::spawn(async move { beat.send(()).unwrap() });
                heard
                    .await
                    .expect("another task ran while the write was stuck");
                assert!(
                    !write.is_finished(),
                    "the write waits for the FIFO's reader"
                );

                // Be the reader: the write goes on and its bytes arrive.
                let bytes = tokio::task::spawn_blocking(move || fs::read(&tmp).unwrap())
                    .await
                    .unwrap();
                let intent: Intent = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(intent.volume, "pvc-1");
                // fsync of a FIFO fails (EINVAL): what matters is that the
                // write finished, and said so.
                let _ = write.await.unwrap();
            });
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(60)) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("the runtime thread stalled behind a blocked ledger write")
            }
            // Finished, or failed an assertion: join tells which.
            _ => runner.join().unwrap(),
        }
    }
}
