//! Agent-to-agent transfer (issue 15): a Pull server on 127.0.0.1 over a
//! real image pool on this machine's disk, and the receiver pulling into a
//! folder beside it; mutual TLS with trust folders laid out as kubelet
//! lays out a Secret volume.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use stead::storage::{AccessKind, Allocation, FsType, NewVolume, PoolSpec, Store, VolumeId};
use stead::transfer::{self, Options, SourceRef, Sources, TransferService, TrustDir, certs};
use tokio::sync::oneshot;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Deadline for conditions the tests wait on (a pull's progress); generous
/// for a loaded 2-core machine, never slept.
const DEADLINE: Duration = Duration::from_secs(120);

/// A pool on this machine's disk, its store, and a folder to pull into.
struct Bench {
    _root: tempfile::TempDir,
    store: Arc<Store>,
    into: PathBuf,
}

impl Bench {
    fn new() -> Bench {
        // Under the target folder, not /tmp: on the machine's disk either
        // way here, but a tmpfs /tmp elsewhere would not keep holes.
        let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let spec: PoolSpec = format!("img:image:{}:reserve=0", root.path().join("pool").display())
            .parse()
            .unwrap();
        let dir_spec: PoolSpec = format!("d:dir:{}:reserve=0", root.path().join("dirs").display())
            .parse()
            .unwrap();
        let store = Arc::new(Store::open(&[spec, dir_spec]).unwrap());
        let into = root.path().join("target-volume");
        fs::create_dir(&into).unwrap();
        Bench {
            _root: root,
            store,
            into,
        }
    }

    /// A thin 1 GiB image volume with `regions` written (pseudo-random
    /// bytes), and a snapshot of it; returns the snapshot's data file.
    fn sparse_snapshot(&self, name: &str, regions: &[(u64, u64)]) -> (SourceRef, PathBuf) {
        self.snapshot_with_zeros(name, regions, &[])
    }

    /// [`Bench::sparse_snapshot`], with `zeros` written as zero bytes
    /// (allocated extents that hold nothing).
    fn snapshot_with_zeros(
        &self,
        name: &str,
        regions: &[(u64, u64)],
        zeros: &[(u64, u64)],
    ) -> (SourceRef, PathBuf) {
        let id = VolumeId::parse(name).unwrap();
        let (meta, _) = self
            .store
            .create(&NewVolume {
                id: id.clone(),
                pool: Some("img".into()),
                access: AccessKind::Mount {
                    fs_type: FsType::Ext4,
                },
                required: GIB,
                limit: 0,
                allocation: Some(Allocation::Thin),
            })
            .unwrap();
        let img = self.store.data_path(&meta).unwrap();
        let f = File::options().write(true).open(&img).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ name.len() as u64;
        for &(at, len) in regions {
            let mut left = len;
            let mut pos = at;
            while left > 0 {
                let n = left.min(4 * MIB);
                f.write_all_at(&noise(&mut seed, n as usize), pos).unwrap();
                pos += n;
                left -= n;
            }
        }
        for &(at, len) in zeros {
            f.write_all_at(&vec![0u8; len as usize], at).unwrap();
        }
        f.sync_all().unwrap();
        let snap = VolumeId::parse(&format!("snap-{name}")).unwrap();
        let (smeta, _) = self.store.create_snapshot(&snap, &id).unwrap();
        let path = self.store.snapshot_data_path(&smeta).unwrap();
        (SourceRef::Snapshot(snap), path)
    }

    fn target(&self) -> PathBuf {
        self.into.join("disk.img")
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(&self.into)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// Bytes that do not compress and are never all zero (xorshift64).
fn noise(seed: &mut u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        out.extend_from_slice(&(*seed | 1).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Data bytes of `path` at and after `from` (its extents, as the kernel
/// reports them).
fn data_bytes(path: &Path, from: u64) -> u64 {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    transfer::extent::data_extents(&f, from, size)
        .map(|r| r.unwrap())
        .map(|r| r.end - r.start)
        .sum()
}

/// Asserts that two files have the same size and bytes.
fn assert_same_content(a: &Path, b: &Path) {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let size = fa.metadata().unwrap().len();
    assert_eq!(size, fb.metadata().unwrap().len(), "sizes differ");
    let (mut ba, mut bb) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(4 * MIB) as usize;
        fa.read_exact_at(&mut ba[..n], pos).unwrap();
        fb.read_exact_at(&mut bb[..n], pos).unwrap();
        assert!(
            ba[..n] == bb[..n],
            "content differs in [{pos}, {})",
            pos + n as u64
        );
        pos += n as u64;
    }
}

fn blake3_of(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(path).unwrap()).unwrap();
    h.finalize().to_hex().to_string()
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// Trust material in the layout kubelet gives a Secret volume: the files
/// in a timestamped folder, `..data` pointing at it, the names through
/// `..data`. [`Secret::swap`] replaces it as kubelet does, in one rename.
struct Secret {
    dir: PathBuf,
    generation: u32,
}

impl Secret {
    fn new(parent: &Path, name: &str, material: &certs::Material) -> Secret {
        let dir = parent.join(name);
        fs::create_dir_all(&dir).unwrap();
        let mut s = Secret { dir, generation: 0 };
        s.swap(material);
        for n in ["ca.crt", "tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{n}"), s.dir.join(n)).unwrap();
        }
        s
    }

    fn swap(&mut self, material: &certs::Material) {
        self.generation += 1;
        let ts = format!(
            "..2026_12_01_00_00_0{}.{}",
            self.generation, self.generation
        );
        material.write_to(&self.dir.join(&ts)).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn trust(&self) -> Arc<TrustDir> {
        Arc::new(TrustDir::open(&self.dir, transfer::DEFAULT_SERVER_NAME).unwrap())
    }
}

fn material(name: &str) -> certs::Material {
    certs::generate(name, 2).unwrap()
}

/// A Pull server on 127.0.0.1, stopped when dropped.
struct Server {
    addr: String,
    service: TransferService,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), transfer::Error>>,
}

impl Server {
    async fn start(sources: Arc<dyn Sources>, trust: Arc<TrustDir>) -> Server {
        let listener = transfer::server::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let service = TransferService::new(sources);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(transfer::serve(listener, service.clone(), trust, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            service,
            stop: Some(stop),
            task,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

fn once() -> Options {
    Options {
        attempts: 1,
        ..Options::default()
    }
}

/// The checkpoint's offset, read as the receiver wrote it.
fn checkpoint_offset(bench: &Bench) -> u64 {
    let raw = fs::read(bench.into.join(".transfer-disk.img.json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    v["offset"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_snapshot_arrives_whole_and_its_holes_are_never_sent() {
    let b = Bench::new();
    let regions = [
        (0, 3 * MIB + 4096),
        (300 * MIB + 12_288, MIB),
        (700 * MIB, 17 * MIB),
        (GIB - 2 * MIB, 2 * MIB),
    ];
    let (source, src) = b.sparse_snapshot("v-sparse", &regions);
    let secret = Secret::new(
        b._root.path(),
        "trust",
        &material(transfer::DEFAULT_SERVER_NAME),
    );
    let trust = secret.trust();
    let server = Server::start(b.store.clone(), trust.clone()).await;

    let wire = Arc::new(AtomicU64::new(0));
    let options = Options {
        wire_bytes: Some(wire.clone()),
        ..Options::default()
    };
    let report = transfer::pull(&server.addr, &trust, &source, &b.target(), &options)
        .await
        .unwrap();

    let data = data_bytes(&src, 0);
    assert!(data < 30 * MIB, "the source is sparse: {data} data bytes");
    assert_eq!(report.size, GIB);
    assert_eq!(report.resumed_from, 0);
    assert_eq!(
        report.received_bytes, data,
        "exactly the data extents were received"
    );
    assert_eq!(report.streams, 1);
    // TLS records and HTTP/2 frames add a little; a hole on the wire
    // would add at least a megabyte.
    let on_wire = wire.load(Ordering::Relaxed);
    assert!(
        on_wire >= data && on_wire < data + data / 50 + 256 * 1024,
        "{on_wire} bytes on the wire for {data} data bytes"
    );
    assert_same_content(&src, &b.target());
    assert_eq!(blake3_of(&src), blake3_of(&b.target()));
    let (a_src, a_dst) = (allocated(&src), allocated(&b.target()));
    assert!(
        a_dst.abs_diff(a_src) <= MIB,
        "allocated: source {a_src}, target {a_dst}"
    );
    assert_eq!(
        data_bytes(&b.target(), 0),
        data,
        "the target keeps the holes"
    );
    assert_eq!(b.entries(), vec!["disk.img"], "no work file is left");

    // Done is done: a second call finds the target and refuses to
    // overwrite it.
    let again = transfer::pull(&server.addr, &trust, &source, &b.target(), &once()).await;
    assert!(
        matches!(again, Err(transfer::Error::TargetExists(_))),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeros_written_in_the_source_are_not_sent_and_the_content_is_the_same() {
    let b = Bench::new();
    // 8 MiB of zeros written (allocated, as mkfs's tables and journal are)
    // between 2 MiB and 3 MiB of data, the last chunk half zero.
    let regions = [(0, 2 * MIB), (10 * MIB, 3 * MIB + MIB / 2)];
    let zeros = [(2 * MIB, 8 * MIB), (13 * MIB + MIB / 2, MIB / 2)];
    let (source, src) = b.snapshot_with_zeros("v-zeros", &regions, &zeros);
    assert!(
        data_bytes(&src, 0) >= 14 * MIB,
        "the zeros are allocated in the source: {} data bytes",
        data_bytes(&src, 0)
    );
    let secret = Secret::new(
        b._root.path(),
        "trust",
        &material(transfer::DEFAULT_SERVER_NAME),
    );
    let trust = secret.trust();
    let server = Server::start(b.store.clone(), trust.clone()).await;
    let report = transfer::pull(
        &server.addr,
        &trust,
        &source,
        &b.target(),
        &Options::default(),
    )
    .await
    .unwrap();
    // The whole-zero chunks stay home; the half-zero one goes whole.
    assert_eq!(report.received_bytes, 2 * MIB + 4 * MIB, "{report:?}");
    assert_same_content(&src, &b.target());
    assert_eq!(blake3_of(&src), blake3_of(&b.target()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_resumes_and_only_the_rest_is_sent() {
    let b = Bench::new();
    let (source, src) = b.sparse_snapshot("v-cut", &[(10 * MIB, 40 * MIB), (900 * MIB, 24 * MIB)]);
    let secret = Secret::new(
        b._root.path(),
        "trust",
        &material(transfer::DEFAULT_SERVER_NAME),
    );
    let trust = secret.trust();
    let server = Server::start(b.store.clone(), trust.clone()).await;
    let total = data_bytes(&src, 0);

    server.service.cut_next_stream_after(20 * MIB);
    let cut = transfer::pull(&server.addr, &trust, &source, &b.target(), &once()).await;
    let Err(transfer::Error::Rpc { status, .. }) = &cut else {
        panic!("the cut stream should fail the pull: {cut:?}");
    };
    assert!(status.message().contains("cut"), "{status:?}");
    assert!(
        !b.target().exists(),
        "nothing is installed before it is verified"
    );
    let checkpoint = checkpoint_offset(&b);
    assert_eq!(
        checkpoint,
        10 * MIB + 20 * MIB,
        "checkpointed where the stream broke"
    );

    let report = transfer::pull(&server.addr, &trust, &source, &b.target(), &once())
        .await
        .unwrap();
    assert_eq!(report.resumed_from, checkpoint);
    assert_eq!(report.received_bytes, data_bytes(&src, checkpoint));
    assert_eq!(
        report.received_bytes,
        total - 20 * MIB,
        "only the rest was sent"
    );
    assert_same_content(&src, &b.target());
    assert_eq!(b.entries(), vec!["disk.img"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_is_resumed_within_the_same_pull() {
    let b = Bench::new();
    let (source, src) = b.sparse_snapshot("v-retry", &[(0, 8 * MIB), (512 * MIB, 8 * MIB)]);
    let secret = Secret::new(
        b._root.path(),
        "trust",
        &material(transfer::DEFAULT_SERVER_NAME),
    );
    let trust = secret.trust();
    let server = Server::start(b.store.clone(), trust.clone()).await;

    server.service.cut_next_stream_after(5 * MIB);
    let report = transfer::pull(
        &server.addr,
        &trust,
        &source,
        &b.target(),
        &Options::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.streams, 2);
    assert_eq!(report.received_bytes, data_bytes(&src, 0), "no byte twice");
    assert_same_content(&src, &b.target());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_changed_since_the_checkpoint_starts_over() {
    let b = Bench::new();
    let (_, _) = b.sparse_snapshot("v-changes", &[(0, 16 * MIB)]);
    let id = VolumeId::parse("v-changes").unwrap();
    let src = b.store.data_path(&b.store.get(&id).unwrap()).unwrap();
    let source = SourceRef::Volume(id);
    let secret = Secret::new(
        b._root.path(),
        "trust",
        &material(transfer::DEFAULT_SERVER_NAME),
    );
    let trust = secret.trust();
    let server = Server::start(b.store.clone(), trust.clone()).await;

    server.service.cut_next_stream_after(8 * MIB);
    assert!(
        transfer::pull(&server.addr, &trust, &source, &b.target(), &once())
            .await
            .is_err()
    );
    assert_eq!(checkpoint_offset(&b), 8 * MIB);
    // The volume is written meanwhile (below and above the checkpoint).
    let f = File::options().write(true).open(&src).unwrap();
    f.write_all_at(&[0xAB; 4096], 4096).unwrap();
    f.write_all_at(&[0xCD; 8192], 600 * MIB).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let report = transfer::pull(&server.addr, &trust, &source, &b.target(), &once())
        .await
        .unwrap();
    assert_eq!(report.resumed_from, 0, "started over");
    assert_eq!(report.received_bytes, data_bytes(&src, 0));
    assert_same_content(&src, &b.target());
    assert_eq!(b.entries(), vec!["disk.img"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_between_chunks_resumes_from_its_checkpoint() {
    let b = Bench::new();
    let (source, src) = b.sparse_snapshot("v-kill", &[(MIB, 96 * MIB), (800 * MIB, 64 * MIB)]);
    let secret = Secret::new(
        b._root.path(),
        "trust",
        &material(transfer::DEFAULT_SERVER_NAME),
    );
    let trust = secret.trust();
    let server = Server::start(b.store.clone(), trust.clone()).await;

    let (progress, mut seen) = tokio::sync::watch::channel(0u64);
    let options = Options {
        checkpoint_every: 8 * MIB,
        progress: Some(progress),
        ..once()
    };
    let task = {
        let (addr, trust, source, target) = (
            server.addr.clone(),
            trust.clone(),
            source.clone(),
            b.target(),
        );
        tokio::spawn(async move { transfer::pull(&addr, &trust, &source, &target, &options).await })
    };
    // Waits (with a deadline, never a fixed sleep) until the receiver has
    // written some 40 MiB, then kills it between two chunks.
    tokio::time::timeout(DEADLINE, seen.wait_for(|&upto| upto >= 40 * MIB))
        .await
        .expect("the pull made no progress")
        .expect("the pull ended before it made progress");
    task.abort();
    assert!(
        task.await.unwrap_err().is_cancelled(),
        "killed before it finished"
    );
    assert!(!b.target().exists());
    let checkpoint = checkpoint_offset(&b);
    assert!(
        checkpoint >= 8 * MIB,
        "a checkpoint was written: {checkpoint}"
    );

    let report = transfer::pull(&server.addr, &trust, &source, &b.target(), &once())
        .await
        .unwrap();
    assert!(report.resumed_from >= checkpoint && report.resumed_from > 0);
    assert_eq!(report.received_bytes, data_bytes(&src, report.resumed_from));
    assert!(report.received_bytes < data_bytes(&src, 0));
    assert_same_content(&src, &b.target());
    assert_eq!(b.entries(), vec!["disk.img"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_and_a_digest_mismatch_leave_nothing_in_the_folder() {
    let b = Bench::new();
    let (source, _src) = b.sparse_snapshot("v-roll", &[(0, 16 * MIB)]);
    let secret = Secret::new(
        b._root.path(),
        "trust",
        &material(transfer::DEFAULT_SERVER_NAME),
    );
    let trust = secret.trust();
    let server = Server::start(b.store.clone(), trust.clone()).await;

    // An explicit rollback of a broken transfer.
    server.service.cut_next_stream_after(4 * MIB);
    assert!(
        transfer::pull(&server.addr, &trust, &source, &b.target(), &once())
            .await
            .is_err()
    );
    assert!(b.entries().len() >= 2, "staged: {:?}", b.entries());
    transfer::rollback(&b.target()).unwrap();
    assert_eq!(b.entries(), Vec::<String>::new());
    transfer::rollback(&b.target()).unwrap();

    // Staged data damaged on this disk between two streams: the digest
    // of the result differs from the sender's, and all of it goes.
    server.service.cut_next_stream_after(4 * MIB);
    assert!(
        transfer::pull(&server.addr, &trust, &source, &b.target(), &once())
            .await
            .is_err()
    );
    let part = File::options()
        .write(true)
        .open(b.into.join(".transfer-disk.img.part"))
        .unwrap();
    part.write_all_at(b"damaged", 1000).unwrap();
    drop(part);
    let r = transfer::pull(&server.addr, &trust, &source, &b.target(), &once()).await;
    assert!(
        matches!(r, Err(transfer::Error::DigestMismatch { .. })),
        "{r:?}"
    );
    assert_eq!(b.entries(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_another_ca_or_name_are_refused() {
    let b = Bench::new();
    let (source, _src) = b.sparse_snapshot("v-tls", &[(0, MIB)]);
    let ours = material(transfer::DEFAULT_SERVER_NAME);
    let server_secret = Secret::new(b._root.path(), "server", &ours);
    let server = Server::start(b.store.clone(), server_secret.trust()).await;

    // A client that trusts the server's CA but whose own certificate
    // another CA signed: the server refuses it.
    let theirs = material(transfer::DEFAULT_SERVER_NAME);
    let stranger = Secret::new(
        b._root.path(),
        "stranger",
        &certs::Material {
            ca_pem: ours.ca_pem.clone(),
            ..theirs
        },
    );
    let r = transfer::pull(
        &server.addr,
        &stranger.trust(),
        &source,
        &b.target(),
        &once(),
    )
    .await;
    assert!(r.is_err(), "a client of another CA was served");
    assert_eq!(
        b.entries(),
        Vec::<String>::new(),
        "nothing made for a refused peer"
    );

    // A server whose certificate carries another name: the client refuses
    // it, though the CA is one it trusts.
    let other = material("someone-else.example");
    let wrong_secret = Secret::new(b._root.path(), "wrong-name", &other);
    let wrong = Server::start(b.store.clone(), wrong_secret.trust()).await;
    let r = transfer::pull(
        &wrong.addr,
        &wrong_secret.trust(),
        &source,
        &b.target(),
        &once(),
    )
    .await;
    let Err(e) = r else {
        panic!("a server with the wrong name was trusted");
    };
    assert!(
        e.to_string().contains("not valid for name"),
        "refused for its name: {e:?}"
    );
    assert_eq!(b.entries(), Vec::<String>::new());

    // A volume of the dir backend: refused by name, not half-sent.
    let dir_id = VolumeId::parse("v-dir").unwrap();
    b.store
        .create(&NewVolume {
            id: dir_id.clone(),
            pool: Some("d".into()),
            access: AccessKind::Mount {
                fs_type: FsType::Ext4,
            },
            required: MIB,
            limit: 0,
            allocation: None,
        })
        .unwrap();
    let r = transfer::pull(
        &server.addr,
        &server_secret.trust(),
        &SourceRef::Volume(dir_id),
        &b.target(),
        &Options::default(),
    )
    .await;
    let Err(transfer::Error::Rpc { status, .. }) = r else {
        panic!("a dir volume was sent: {r:?}");
    };
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert!(status.message().contains("dir backend"), "{status:?}");
    assert_eq!(b.entries(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_goes_silent_after_the_handshake_is_given_up_on() {
    // A peer that completes TLS with a certificate the client trusts, then
    // never answers: no HTTP/2 settings, no headers, no data. The pull must
    // end with an error that says so, not wait on it for ever.
    let b = Bench::new();
    let (source, _src) = b.sparse_snapshot("v-silent", &[(0, MIB)]);
    let secret = Secret::new(
        b._root.path(),
        "silent",
        &material(transfer::DEFAULT_SERVER_NAME),
    );
    let trust = secret.trust();
    let config = trust.server_config().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel();
    let silent = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
            if let Ok(tls) = acceptor.accept(tcp).await {
                // Held open, never read or written.
                held_tx.send(tls).unwrap();
            }
        }
    });
    let options = Options {
        attempts: 2,
        stall: Duration::from_secs(2),
        ..Options::default()
    };
    let r = tokio::time::timeout(
        DEADLINE,
        transfer::pull(&addr, &trust, &source, &b.target(), &options),
    )
    .await
    .expect("a pull from a silent peer never ended");
    let Err(e) = r else {
        panic!("a silent peer served a pull");
    };
    assert!(
        e.to_string().contains("without a byte"),
        "the error names the silence: {e}"
    );
    // Both attempts reached the peer and were held.
    assert!(held.recv().await.is_some() && held.recv().await.is_some());
    assert_eq!(b.entries(), Vec::<String>::new(), "nothing made");
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_trust_is_used_by_new_connections_without_a_restart() {
    let b = Bench::new();
    let (source, src) = b.sparse_snapshot("v-rotate", &[(0, 2 * MIB)]);
    let old = material(transfer::DEFAULT_SERVER_NAME);
    let new = material(transfer::DEFAULT_SERVER_NAME);
    let mut server_secret = Secret::new(b._root.path(), "server", &old);
    let old_client = Secret::new(b._root.path(), "client-old", &old);
    let new_client = Secret::new(b._root.path(), "client-new", &new);
    let server = Server::start(b.store.clone(), server_secret.trust()).await;

    let first = b.into.join("first.img");
    transfer::pull(&server.addr, &old_client.trust(), &source, &first, &once())
        .await
        .unwrap();

    // Kubelet's update of the Secret: a new CA and leaf, one rename. The
    // server is not restarted.
    server_secret.swap(&new);
    let refused = b.into.join("refused.img");
    let r = transfer::pull(
        &server.addr,
        &old_client.trust(),
        &source,
        &refused,
        &once(),
    )
    .await;
    assert!(
        r.is_err(),
        "the old CA is no longer trusted by new connections"
    );
    let second = b.into.join("second.img");
    transfer::pull(&server.addr, &new_client.trust(), &source, &second, &once())
        .await
        .unwrap();
    assert_same_content(&src, &second);
    assert!(!server.task.is_finished(), "the same server served both");
    assert_eq!(b.entries(), vec!["first.img", "second.img"]);
}
