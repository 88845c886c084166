//! The receiving side: pulls a source from a peer into a staging file
//! beside the target, resumably, and renames it into place once the whole
//! content digest matches the sender's.
//!
//! ```text
//! <folder>/.transfer-<name>.part   the staging file (sparse; holes never written)
//! <folder>/.transfer-<name>.json   the checkpoint: source, generation, size,
//!                                  and the offset below which every data
//!                                  byte of the source is in the staging file
//!                                  and durable (or, once verified, its digest)
//! <folder>/<name>                  the target, made only by the final rename
//! ```
//!
//! Crash safety, instruction by instruction: the staging file is made and
//! sized, then the first checkpoint (offset 0) written through a temporary
//! file, fsync and rename; chunks are written at their offsets, and every
//! [`Options::checkpoint_every`] bytes (and when a stream breaks) the
//! staging file is fsync'd before the checkpoint moves forward, so a
//! checkpoint never claims more than the disk holds. A resume asks the
//! peer for the data at and after the checkpoint's offset; data written
//! past it by the earlier attempt is the same source's (the generation is
//! checked) and is simply written again. Once the trailer's digest matches,
//! the checkpoint records it, the staging file is renamed onto the target
//! and the folder fsync'd, and the checkpoint removed; a crash in between
//! is finished by the next call without the network. A digest mismatch or
//! [`rollback`] removes the staging file and the checkpoint: nothing is
//! left in the folder that the transfer made.
//!
//! The target's folder is the caller's (for a restore, the new volume's
//! folder, which carries the storage layer's `.restoring` marker until its
//! record is written, so that recovery removes a restore that never
//! finished). The caller serializes transfers per target (the provisioner
//! holds the volume's lock); a second concurrent call in this process for
//! the same target is refused ([`Error::Busy`]).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::transfer::v1 as pb;
use crate::proto::transfer::v1::transfer_client::TransferClient;

use super::digest::ContentDigest;
use super::tls::Counted;
use super::{CHUNK_BYTES, Error, SourceRef, TrustDir, extent};

const STAGING_PREFIX: &str = ".transfer-";
const CHECKPOINT_VERSION: u32 = 1;
/// The largest chunk accepted from a peer (the sender cuts 1 MiB ones).
const MAX_CHUNK: u64 = 4 * CHUNK_BYTES as u64;

/// How a pull goes about it.
#[derive(Debug, Clone)]
pub struct Options {
    /// Data bytes received between durable checkpoints (the most a crash
    /// of this agent makes the peer send again).
    pub checkpoint_every: u64,
    /// Streams tried, a broken one resumed from its checkpoint, before the
    /// pull gives up (its checkpoint kept for a later call).
    pub attempts: u32,
    /// Added to with every byte read from the network (TLS records and
    /// HTTP/2 frames included), for measurements.
    pub wire_bytes: Option<Arc<AtomicU64>>,
    /// Set to the end of the data received so far after each chunk.
    pub progress: Option<tokio::sync::watch::Sender<u64>>,
    /// How long a stream may go without a message (header, chunk or
    /// trailer) before it counts as broken and is retried from its
    /// checkpoint. The sender reads one chunk per message, so the default
    /// is far above a slow disk's time for one.
    pub stall: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            checkpoint_every: 64 << 20,
            attempts: 5,
            wire_bytes: None,
            progress: None,
            stall: Duration::from_secs(60),
        }
    }
}

/// HTTP/2 pings on the pull's connection, and how long one may go
/// unanswered.
pub(super) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
pub(super) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// What a pull did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Logical size of the target.
    pub size: u64,
    /// Offset the first stream of this call started at (0: from scratch).
    pub resumed_from: u64,
    /// Data bytes received by this call, over all its streams.
    pub received_bytes: u64,
    /// Streams this call opened.
    pub streams: u32,
    /// The verified content digest (hex).
    pub digest: String,
}

/// The checkpoint file's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Checkpoint {
    version: u32,
    source: String,
    generation: String,
    size: u64,
    offset: u64,
    /// Set once the staging file's digest matched the sender's.
    #[serde(default)]
    verified: Option<String>,
}

/// The work files of a transfer into `target`.
#[derive(Debug, Clone)]
struct Paths {
    target: PathBuf,
    folder: PathBuf,
    staging: PathBuf,
    checkpoint: PathBuf,
    checkpoint_tmp: PathBuf,
}

impl Paths {
    fn of(target: &Path) -> Result<Paths, Error> {
        let bad = |reason: &str| Error::BadRequest {
            field: "target",
            reason: format!("{}: {reason}", target.display()),
        };
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| bad("has no UTF-8 file name"))?;
        let folder = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| bad("has no folder"))?;
        Ok(Paths {
            target: target.to_owned(),
            folder: folder.to_owned(),
            staging: folder.join(format!("{STAGING_PREFIX}{name}.part")),
            checkpoint: folder.join(format!("{STAGING_PREFIX}{name}.json")),
            checkpoint_tmp: folder.join(format!("{STAGING_PREFIX}{name}.json.tmp")),
        })
    }

    fn sync_folder(&self) -> Result<(), Error> {
        File::open(&self.folder)
            .and_then(|f| f.sync_all())
            .map_err(Error::io("syncing the target's folder", &self.folder))
    }

    fn read_checkpoint(&self) -> Result<Option<Checkpoint>, Error> {
        match fs::read(&self.checkpoint) {
            Ok(bytes) => match serde_json::from_slice::<Checkpoint>(&bytes) {
                Ok(c) if c.version == CHECKPOINT_VERSION => Ok(Some(c)),
                // Unreadable or of another version: as if none, and the
                // transfer starts over (nothing is trusted that cannot be
                // read back).
                Ok(_) | Err(_) => {
                    tracing::warn!(checkpoint = %self.checkpoint.display(),
                        "transfer checkpoint unreadable; starting over");
                    Ok(None)
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("reading the checkpoint", &self.checkpoint)(e)),
        }
    }

    /// Writes the checkpoint durably: temporary file, fsync, rename,
    /// folder fsync.
    fn write_checkpoint(&self, c: &Checkpoint) -> Result<(), Error> {
        let tmp = &self.checkpoint_tmp;
        let bytes = serde_json::to_vec(c).map_err(|e| {
            Error::io("encoding the checkpoint", tmp)(io::Error::other(e.to_string()))
        })?;
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(tmp, &self.checkpoint)
        };
        write().map_err(Error::io("writing the checkpoint", tmp))?;
        self.sync_folder()
    }

    /// Removes the staging file and the checkpoint, then fsyncs the folder.
    fn remove_work(&self) -> Result<(), Error> {
        for p in [&self.staging, &self.checkpoint_tmp, &self.checkpoint] {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("removing", p)(e)),
            }
        }
        match File::open(&self.folder) {
            Ok(f) => f
                .sync_all()
                .map_err(Error::io("syncing the target's folder", &self.folder)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("opening the target's folder", &self.folder)(e)),
        }
    }

    /// Renames the verified staging file onto the target and removes the
    /// checkpoint, each step made durable.
    fn install(&self) -> Result<(), Error> {
        fs::rename(&self.staging, &self.target)
            .map_err(Error::io("renaming the staging file onto", &self.target))?;
        self.sync_folder()?;
        match fs::remove_file(&self.checkpoint) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing", &self.checkpoint)(e)),
        }
        self.sync_folder()
    }
}

/// Removes everything a transfer into `target` made and did not finish
/// (staging file and checkpoint); a finished target is left alone.
/// Idempotent.
pub fn rollback(target: &Path) -> Result<(), Error> {
    let paths = Paths::of(target)?;
    let _guard = InFlight::claim(&paths.target)?;
    paths.remove_work()
}

/// Targets with a pull under way in this process.
static IN_FLIGHT: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);

struct InFlight(PathBuf);

impl InFlight {
    fn claim(target: &Path) -> Result<InFlight, Error> {
        let mut set = IN_FLIGHT.lock().unwrap_or_else(PoisonError::into_inner);
        if !set.insert(target.to_owned()) {
            return Err(Error::Busy(target.to_owned()));
        }
        Ok(InFlight(target.to_owned()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// What is on disk before a stream starts.
enum Start {
    /// A transfer to resume (or start, at offset 0).
    Resume(Checkpoint),
    /// Nothing staged yet.
    Fresh,
    /// Finished by an earlier call (or by finishing its install now).
    Done(Report),
}

/// Runs a step that touches the disk on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io {
            what: "running a blocking step of the transfer",
            path: PathBuf::new(),
            source: io::Error::other(e.to_string()),
        })?
}

/// Finds what an earlier call left for `source` into the target.
fn inspect(paths: &Paths, source: &str) -> Result<Start, Error> {
    let checkpoint = paths.read_checkpoint()?;
    let staged = paths.staging.exists();
    let target = paths.target.exists();
    match checkpoint {
        Some(c) if c.source == source && c.verified.is_some() && (target || staged) => {
            if staged {
                // Verified, killed before or during the rename.
                if target {
                    return Err(Error::TargetExists(paths.target.clone()));
                }
                paths.install()?;
            } else {
                // Renamed, killed before the checkpoint was removed.
                paths.remove_work()?;
            }
            Ok(Start::Done(Report {
                size: c.size,
                resumed_from: c.size,
                received_bytes: 0,
                streams: 0,
                digest: c.verified.unwrap_or_default(),
            }))
        }
        _ if target => Err(Error::TargetExists(paths.target.clone())),
        Some(c) if c.source == source && staged => Ok(Start::Resume(c)),
        Some(_) | None => {
            if staged || paths.checkpoint.exists() {
                tracing::info!(target = %paths.target.display(), %source,
                    "discarding a staged transfer of another source, or without its checkpoint");
                paths.remove_work()?;
            }
            Ok(Start::Fresh)
        }
    }
}

/// Pulls `source` from the agent at `peer` (host:port) into `target`,
/// which must not exist: resumes what an earlier call staged, verifies
/// the content digest, then renames the result into place. A pull that
/// fails on the network keeps its checkpoint for the next call; one whose
/// digest differs removes everything it made.
pub async fn pull(
    peer: &str,
    trust: &Arc<TrustDir>,
    source: &SourceRef,
    target: &Path,
    options: &Options,
) -> Result<Report, Error> {
    let paths = Paths::of(target)?;
    let _guard = InFlight::claim(&paths.target)?;
    let name = source.to_string();
    let start = {
        let (paths, name) = (paths.clone(), name.clone());
        blocking(move || inspect(&paths, &name)).await?
    };
    let mut state = match start {
        Start::Done(report) => return Ok(report),
        Start::Resume(c) => Some(c),
        Start::Fresh => None,
    };
    let mut resumed_from = state.as_ref().map_or(0, |c| c.offset);
    let mut run = Run {
        peer,
        source,
        paths: &paths,
        options,
        received: 0,
        streams: 0,
        digest: None,
    };
    let mut last = None;
    let attempts = options.attempts.max(1);
    let mut attempt = 0;
    // A source that changed since the checkpoint starts over at once, not
    // counted as an attempt; bounded, for a source that keeps changing.
    let mut restarts = 0;
    while attempt < attempts {
        if attempt > 0 {
            // Backoff between streams: a peer restarting, a network blip.
            tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
        }
        attempt += 1;
        match run.stream(trust, &mut state).await {
            Ok(digest) => {
                let size = state.as_ref().map_or(0, |c| c.size);
                tracing::info!(peer, source = %source, target = %target.display(),
                    size, resumed_from, received.bytes = run.received, streams = run.streams,
                    "transfer verified and installed");
                return Ok(Report {
                    size,
                    resumed_from,
                    received_bytes: run.received,
                    streams: run.streams,
                    digest,
                });
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Restart(e)) if restarts < 2 => {
                tracing::info!(peer, source = %source, target = %target.display(), reason = %e,
                    "transfer starts over");
                restarts += 1;
                attempt -= 1;
                resumed_from = 0;
            }
            Err(Failure::Retry(e) | Failure::Restart(e)) => {
                tracing::warn!(peer, source = %source, target = %target.display(),
                    attempt, error = %e, "transfer stream broke; resuming from the checkpoint");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Connect {
        peer: peer.to_owned(),
        reason: "no stream was tried".into(),
    }))
}

/// Why a stream ended without a verified target.
enum Failure {
    /// Worth another stream from the checkpoint.
    Retry(Error),
    /// The source changed since the checkpoint, which is gone: another
    /// stream from the start.
    Restart(Error),
    /// Not: the request, the source or the data is wrong.
    Fatal(Error),
}

struct Run<'a> {
    peer: &'a str,
    source: &'a SourceRef,
    paths: &'a Paths,
    options: &'a Options,
    received: u64,
    streams: u32,
    /// The digest of the staged data below an offset, carried from one
    /// stream of this call to the next.
    digest: Option<(u64, ContentDigest)>,
}

/// The staging file and how far it is.
struct Staged {
    file: Arc<File>,
    checkpoint: Checkpoint,
    /// End of the data received (not yet durable beyond the checkpoint).
    received_upto: u64,
    /// The checkpoint being made durable in the background (its offset):
    /// data keeps arriving meanwhile, and the checkpoint is only written
    /// once the data below its offset is synced, so it never claims data
    /// the disk does not hold. One at a time.
    syncing: Option<(u64, tokio::task::JoinHandle<Result<(), Error>>)>,
}

impl Staged {
    /// Takes in the background checkpoint if it is done (or, with `wait`,
    /// once it is).
    async fn collect(&mut self, wait: bool, staging: &Path) -> Result<(), Error> {
        let Some((offset, task)) = self.syncing.take() else {
            return Ok(());
        };
        if !wait && !task.is_finished() {
            self.syncing = Some((offset, task));
            return Ok(());
        }
        task.await.map_err(|e| Error::Io {
            what: "syncing the staging file",
            path: staging.to_owned(),
            source: io::Error::other(e.to_string()),
        })??;
        self.checkpoint.offset = offset;
        Ok(())
    }
}

impl Run<'_> {
    /// A peer that sent nothing for `Options::stall`: a connection the
    /// peer dropped without a word (a refused certificate, a node gone), so
    /// the stream is retried from its checkpoint rather than waited on.
    fn stalled(&self, what: &str) -> Failure {
        Failure::Retry(Error::Connect {
            peer: self.peer.to_owned(),
            reason: format!(
                "waited {:.1} s for {what} from {} without a byte",
                self.options.stall.as_secs_f32(),
                self.source
            ),
        })
    }

    fn protocol(&self, reason: String) -> Failure {
        Failure::Fatal(Error::Protocol {
            source_ref: self.source.clone(),
            peer: self.peer.to_owned(),
            reason,
        })
    }

    /// One stream: from the checkpoint in `state` (or from scratch) to a
    /// verified, installed target. Returns the digest (hex).
    async fn stream(
        &mut self,
        trust: &Arc<TrustDir>,
        state: &mut Option<Checkpoint>,
    ) -> Result<String, Failure> {
        let offset = state.as_ref().map_or(0, |c| c.offset);
        let wire = self.options.wire_bytes.clone().unwrap_or_default();
        let mut client = connect(self.peer, trust.clone(), wire)
            .await
            .map_err(Failure::Retry)?;
        self.streams += 1;
        let call = client.pull(pb::PullRequest {
            source: Some(self.source.to_proto()),
            offset,
        });
        let response = tokio::time::timeout(self.options.stall, call)
            .await
            .map_err(|_| self.stalled("the response's headers"))?
            .map_err(|status| self.rpc_failure(status))?;
        let mut stream = response.into_inner();

        let header = match self.next(&mut stream).await? {
            Some(pb::pull_response::Message::Header(h)) => h,
            other => return Err(self.protocol(format!("first message is {other:?}, not a header"))),
        };
        let mut staged = self.open_staging(state, &header, offset).await?;
        // From here on, a broken stream checkpoints what it received.
        let result = self.receive(&mut stream, &mut staged).await;
        // No checkpoint is written behind the ones below.
        let synced = staged.collect(true, &self.paths.staging).await;
        match result {
            Ok(trailer) => {
                synced.map_err(Failure::Fatal)?;
                self.finish(staged, trailer, state).await
            }
            Err(failure) => {
                let upto = staged.received_upto;
                if upto > staged.checkpoint.offset {
                    let mut c = staged.checkpoint.clone();
                    c.offset = upto;
                    if self.make_durable(&staged.file, c.clone()).await.is_ok() {
                        staged.checkpoint = c;
                    }
                }
                *state = Some(staged.checkpoint);
                Err(failure)
            }
        }
    }

    fn rpc_failure(&self, status: tonic::Status) -> Failure {
        use tonic::Code;
        let fatal = matches!(
            status.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::Unimplemented
                | Code::PermissionDenied
                | Code::DataLoss
        );
        let e = Error::Rpc {
            source_ref: self.source.clone(),
            peer: self.peer.to_owned(),
            status,
        };
        if fatal {
            Failure::Fatal(e)
        } else {
            Failure::Retry(e)
        }
    }

    async fn next(
        &self,
        stream: &mut tonic::Streaming<pb::PullResponse>,
    ) -> Result<Option<pb::pull_response::Message>, Failure> {
        let message = tokio::time::timeout(self.options.stall, stream.message())
            .await
            .map_err(|_| self.stalled("the next message"))?;
        match message {
            Ok(Some(m)) => match m.message {
                Some(m) => Ok(Some(m)),
                None => Err(self.protocol("a message with no content".into())),
            },
            Ok(None) => Ok(None),
            Err(status) => Err(self.rpc_failure(status)),
        }
    }

    /// Opens (or makes) the staging file for the stream that `header`
    /// starts; a checkpoint of another generation starts over.
    async fn open_staging(
        &mut self,
        state: &mut Option<Checkpoint>,
        header: &pb::Header,
        offset: u64,
    ) -> Result<Staged, Failure> {
        if let Some(c) = state.as_ref()
            && (c.generation != header.generation || c.size != header.size)
        {
            tracing::info!(source = %self.source, target = %self.paths.target.display(),
                "the source changed since the checkpoint; starting over");
            let paths = self.paths.clone();
            blocking(move || paths.remove_work())
                .await
                .map_err(Failure::Fatal)?;
            *state = None;
            self.digest = None;
            // The stream asked for data after an offset of the old
            // generation: ask again from the start.
            return Err(Failure::Restart(Error::Protocol {
                source_ref: self.source.clone(),
                peer: self.peer.to_owned(),
                reason: "source generation changed; restarting from offset 0".into(),
            }));
        }
        let paths = self.paths.clone();
        let checkpoint = state.clone().unwrap_or(Checkpoint {
            version: CHECKPOINT_VERSION,
            source: self.source.to_string(),
            generation: header.generation.clone(),
            size: header.size,
            offset: 0,
            verified: None,
        });
        let fresh = state.is_none();
        let c = checkpoint.clone();
        let file = blocking(move || {
            let file = if fresh {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&paths.staging)
                    .map_err(Error::io("creating the staging file", &paths.staging))?;
                // Sized, not written: every hole of the source stays one.
                f.set_len(c.size)
                    .map_err(Error::io("sizing the staging file", &paths.staging))?;
                f.sync_all()
                    .map_err(Error::io("syncing the staging file", &paths.staging))?;
                paths.write_checkpoint(&c)?;
                f
            } else {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&paths.staging)
                    .map_err(Error::io("opening the staging file", &paths.staging))?
            };
            Ok(file)
        })
        .await
        .map_err(Failure::Fatal)?;
        *state = Some(checkpoint.clone());
        let file = Arc::new(file);
        // The digest of what is staged below the offset: carried from the
        // previous stream when it ends there, else read back from disk.
        if self.digest.as_ref().is_none_or(|(at, _)| *at != offset) {
            let (f, size, path) = (file.clone(), checkpoint.size, self.paths.staging.clone());
            let d = blocking(move || digest_prefix(&f, size, offset, &path))
                .await
                .map_err(Failure::Fatal)?;
            self.digest = Some((offset, d));
        }
        Ok(Staged {
            file,
            received_upto: offset,
            checkpoint,
            syncing: None,
        })
    }

    /// Receives chunks until the trailer.
    async fn receive(
        &mut self,
        stream: &mut tonic::Streaming<pb::PullResponse>,
        staged: &mut Staged,
    ) -> Result<pb::Trailer, Failure> {
        let size = staged.checkpoint.size;
        loop {
            let chunk = match self.next(stream).await? {
                Some(pb::pull_response::Message::Chunk(c)) => c,
                Some(pb::pull_response::Message::Trailer(t)) => return Ok(t),
                Some(pb::pull_response::Message::Header(_)) => {
                    return Err(self.protocol("a second header".into()));
                }
                None => {
                    return Err(Failure::Retry(Error::Connect {
                        peer: self.peer.to_owned(),
                        reason: format!("the stream of {} ended before its trailer", self.source),
                    }));
                }
            };
            let len = chunk.data.len() as u64;
            if chunk.length != len
                || len == 0
                || len > MAX_CHUNK
                || chunk.offset < staged.received_upto
                || chunk.offset.checked_add(len).is_none_or(|e| e > size)
            {
                return Err(self.protocol(format!(
                    "chunk at offset {} with length {} ({len} bytes of data) after data up to {} of {size} bytes",
                    chunk.offset, chunk.length, staged.received_upto
                )));
            }
            let Some((_, digest)) = self.digest.take() else {
                return Err(self.protocol("internal: no digest in progress".into()));
            };
            let (file, path) = (staged.file.clone(), self.paths.staging.clone());
            let written = tokio::task::spawn_blocking(move || {
                let mut digest = digest;
                if blake3::hash(&chunk.data).as_bytes().as_slice() != chunk.checksum.as_slice() {
                    return (digest, Ok(false));
                }
                let w = file
                    .write_all_at(&chunk.data, chunk.offset)
                    .map_err(Error::io("writing the staging file", &path));
                if w.is_ok() {
                    // In order and within the size: checked above.
                    let _ = digest.update(chunk.offset, &chunk.data);
                }
                (digest, w.map(|()| true))
            })
            .await;
            let (digest, written) = written.map_err(|e| {
                Failure::Fatal(Error::Io {
                    what: "writing the staging file",
                    path: self.paths.staging.clone(),
                    source: io::Error::other(e.to_string()),
                })
            })?;
            let end = chunk.offset + len;
            match written {
                Ok(true) => {}
                // Damaged on the way (TLS makes it unlikely): not written;
                // the next stream sends it again from the checkpoint.
                Ok(false) => {
                    self.digest = None;
                    return Err(Failure::Retry(Error::Protocol {
                        source_ref: self.source.clone(),
                        peer: self.peer.to_owned(),
                        reason: format!("chunk at offset {} failed its checksum", chunk.offset),
                    }));
                }
                Err(e) => {
                    self.digest = None;
                    return Err(Failure::Fatal(e));
                }
            }
            self.digest = Some((end, digest));
            staged.received_upto = end;
            self.received += len;
            if let Some(p) = &self.options.progress {
                p.send_replace(end);
            }
            staged
                .collect(false, &self.paths.staging)
                .await
                .map_err(Failure::Fatal)?;
            if staged.syncing.is_none()
                && end - staged.checkpoint.offset >= self.options.checkpoint_every
            {
                let mut c = staged.checkpoint.clone();
                c.offset = end;
                let (file, paths) = (staged.file.clone(), self.paths.clone());
                let task = tokio::task::spawn_blocking(move || {
                    file.sync_data()
                        .map_err(Error::io("syncing the staging file", &paths.staging))?;
                    paths.write_checkpoint(&c)
                });
                staged.syncing = Some((end, task));
            }
        }
    }

    /// fsyncs the staging file, then writes `c`: the checkpoint never
    /// claims data the disk does not hold.
    async fn make_durable(&self, file: &Arc<File>, c: Checkpoint) -> Result<(), Error> {
        let (file, paths) = (file.clone(), self.paths.clone());
        blocking(move || {
            file.sync_data()
                .map_err(Error::io("syncing the staging file", &paths.staging))?;
            paths.write_checkpoint(&c)
        })
        .await
    }

    /// Checks the trailer against what was received, then installs.
    async fn finish(
        &mut self,
        staged: Staged,
        trailer: pb::Trailer,
        state: &mut Option<Checkpoint>,
    ) -> Result<String, Failure> {
        let size = staged.checkpoint.size;
        if trailer.size != size {
            return Err(self.protocol(format!(
                "trailer size {} differs from the header's {size}",
                trailer.size
            )));
        }
        let Some((_, digest)) = self.digest.take() else {
            return Err(self.protocol("internal: no digest in progress".into()));
        };
        let actual = hex(&digest.finish());
        let expected = hex(&trailer.digest);
        let paths = self.paths.clone();
        let file = staged.file;
        let mut c = staged.checkpoint;
        if actual != expected {
            blocking(move || paths.remove_work())
                .await
                .map_err(Failure::Fatal)?;
            *state = None;
            return Err(Failure::Fatal(Error::DigestMismatch {
                source_ref: self.source.clone(),
                target: self.paths.target.clone(),
                expected,
                actual,
            }));
        }
        c.offset = size;
        c.verified = Some(actual.clone());
        *state = Some(c.clone());
        blocking(move || {
            file.sync_all()
                .map_err(Error::io("syncing the staging file", &paths.staging))?;
            drop(file);
            paths.write_checkpoint(&c)?;
            paths.install()
        })
        .await
        .map_err(Failure::Fatal)?;
        Ok(actual)
    }
}

/// The digest of the data staged below `offset`, read back from the file.
fn digest_prefix(file: &File, size: u64, offset: u64, path: &Path) -> Result<ContentDigest, Error> {
    let mut digest = ContentDigest::new(size);
    let mut buf = vec![0u8; CHUNK_BYTES];
    for extent in extent::data_extents(file, 0, offset) {
        let extent = extent.map_err(Error::io("seeking data in the staging file", path))?;
        let mut pos = extent.start;
        while pos < extent.end {
            let n = (extent.end - pos).min(CHUNK_BYTES as u64) as usize;
            file.read_exact_at(&mut buf[..n], pos)
                .map_err(Error::io("reading the staging file", path))?;
            // Extents are ascending and within the size.
            let _ = digest.update(pos, &buf[..n]);
            pos += n as u64;
        }
    }
    Ok(digest)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A client of the Pull service at `peer` over mutual TLS with `trust`
/// (read again for every connection the channel makes).
pub async fn connect(
    peer: &str,
    trust: Arc<TrustDir>,
    wire: Arc<AtomicU64>,
) -> Result<TransferClient<Channel>, Error> {
    let failed = |reason: String| Error::Connect {
        peer: peer.to_owned(),
        reason,
    };
    let endpoint = Endpoint::from_shared(format!("http://{peer}"))
        .map_err(|e| failed(format!("not an address: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        // A peer that stops answering (its node gone, its connection
        // dropped after a refused handshake) is noticed by the pings.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        // Windows wide enough that the sender is not held back waiting
        // for window updates (h2's default is 64 KiB).
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20));
    let addr = peer.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let (trust, addr, wire) = (trust.clone(), addr.clone(), wire.clone());
        async move {
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let config = trust.client_config().map_err(io::Error::other)?;
            let tls = TlsConnector::from(config)
                .connect(trust.server_name().clone(), Counted::new(tcp, wire))
                .await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| failed(error_chain(&e)))?;
    Ok(TransferClient::new(channel))
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
