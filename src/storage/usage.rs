//! What the trees of `dir` volumes occupy, measured by one thread of the
//! meter's own, never on the threads that stage and publish.
//!
//! A `dir` volume shares its pool's filesystem, so the only measure of what
//! it holds is a walk of its tree, which takes time in proportion to its
//! files. kubelet asks for volume stats every minute for every mounted
//! volume; walking inside that request, on the bounded pool of blocking
//! threads that mounts also use, let one large volume starve the mounts of
//! all the others. Here a stats request gets the last measurement at once
//! (and a fresh one is queued when it is older than asked); only a volume
//! never measured makes its caller wait, asynchronously, for its first walk.
//! Capacity accounting reads the same measurements.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::VolumeId;

/// What a directory tree occupies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Allocated bytes (blocks × 512), not apparent sizes.
    pub bytes: u64,
    /// Entries below the root.
    pub inodes: u64,
}

type Walker = fn(&Path) -> Usage;

#[derive(Debug, Clone, Copy)]
struct Measured {
    usage: Usage,
    at: Instant,
}

#[derive(Debug, Default)]
struct State {
    measured: HashMap<VolumeId, Measured>,
    queue: VecDeque<(VolumeId, PathBuf)>,
    waiting: HashMap<VolumeId, Vec<oneshot::Sender<Usage>>>,
    /// The volume being walked, and whether it was forgotten meanwhile.
    current: Option<(VolumeId, bool)>,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    walker: Walker,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The meter: a cache of measurements and the thread that makes them.
#[derive(Debug)]
pub struct UsageMeter {
    shared: Arc<Shared>,
    /// Whether the meter's thread runs; if it could not be started, walks
    /// happen on the caller's thread (slower, never wrong).
    threaded: bool,
}

/// Name of the meter's thread (seen in `ps -T`, and by the tests).
pub const THREAD_NAME: &str = "stead-usage";

impl UsageMeter {
    /// A meter with its own thread, walking trees with [`tree_usage`].
    pub fn start() -> Self {
        Self::with_walker(tree_usage)
    }

    fn with_walker(walker: Walker) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            walker,
        });
        let worker = shared.clone();
        let threaded = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || work(&worker))
            .map_err(|e| {
                tracing::error!(error = %e, "cannot start the usage meter's thread; directory trees are measured inline")
            })
            .is_ok();
        Self { shared, threaded }
    }

    /// The last measurement of a volume, if any.
    pub fn cached(&self, id: &VolumeId) -> Option<Usage> {
        self.shared.lock().measured.get(id).map(|m| m.usage)
    }

    /// Records that a volume's tree is empty (a volume just created).
    pub fn set_empty(&self, id: &VolumeId) {
        self.shared.lock().measured.insert(
            id.clone(),
            Measured {
                usage: Usage::default(),
                at: Instant::now(),
            },
        );
    }

    /// Drops what is known of a volume (it was deleted); a walk of it in
    /// progress is not recorded.
    pub fn forget(&self, id: &VolumeId) {
        let mut st = self.shared.lock();
        st.measured.remove(id);
        st.queue.retain(|(q, _)| q != id);
        if let Some((current, forgotten)) = &mut st.current
            && current == id
        {
            *forgotten = true;
        }
    }

    /// Queues a measurement of `root` for `id` unless one is queued or
    /// running already; returns at once.
    pub fn refresh(&self, id: &VolumeId, root: PathBuf) {
        if !self.threaded {
            let usage = (self.shared.walker)(&root);
            record(&mut self.shared.lock(), id, usage);
            return;
        }
        let mut st = self.shared.lock();
        let busy = st.queue.iter().any(|(q, _)| q == id)
            || st.current.as_ref().is_some_and(|(c, _)| c == id);
        if !busy {
            st.queue.push_back((id.clone(), root));
            self.shared.wake.notify_one();
        }
    }

    /// The usage of a volume: the last measurement at once (queuing a new
    /// one when it is older than `max_age`), or, for a volume never
    /// measured, the result of its first walk.
    pub async fn measure(&self, id: &VolumeId, root: PathBuf, max_age: Duration) -> Usage {
        let rx = {
            let mut st = self.shared.lock();
            if let Some(m) = st.measured.get(id).copied() {
                drop(st);
                if m.at.elapsed() > max_age {
                    self.refresh(id, root);
                }
                return m.usage;
            }
            let (tx, rx) = oneshot::channel();
            st.waiting.entry(id.clone()).or_default().push(tx);
            rx
        };
        self.refresh(id, root.clone());
        // An error: the meter stopped (the store is closing) or the walk
        // failed. Nothing is known, and walking here would block the
        // caller's (async) thread; stats are advisory, and capacity counts a
        // volume without a measurement whole.
        rx.await.unwrap_or_default()
    }
}

impl Drop for UsageMeter {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
    }
}

/// Stores a measurement and answers whoever waits for it.
fn record(st: &mut State, id: &VolumeId, usage: Usage) {
    st.measured.insert(
        id.clone(),
        Measured {
            usage,
            at: Instant::now(),
        },
    );
    for tx in st.waiting.remove(id).unwrap_or_default() {
        let _ = tx.send(usage);
    }
}

/// The meter's thread: one walk at a time, in the order asked.
fn work(shared: &Shared) {
    loop {
        let (id, root) = {
            let mut st = shared.lock();
            loop {
                if st.stop {
                    // Dropping the waiters' senders tells them to walk
                    // themselves.
                    st.waiting.clear();
                    return;
                }
                if let Some(job) = st.queue.pop_front() {
                    st.current = Some((job.0.clone(), false));
                    break job;
                }
                st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
        };
        // A walk that panics must not leave its waiters waiting forever nor
        // end the meter: they are answered by dropping their senders (they
        // then measure on their own thread) and the next job runs.
        let walked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (shared.walker)(&root)));
        let mut st = shared.lock();
        let forgotten = st.current.take().is_some_and(|(_, f)| f);
        match walked {
            Ok(usage) if !forgotten => record(&mut st, &id, usage),
            Ok(_) => {
                st.waiting.remove(&id);
            }
            Err(_) => {
                tracing::error!(volume.id = %id, root = %root.display(), "measuring a directory tree panicked");
                st.waiting.remove(&id);
            }
        }
    }
}

/// Allocated bytes and entry count of a directory tree, without following
/// symlinks or crossing into other filesystems.
pub fn tree_usage(root: &Path) -> Usage {
    let Ok(top) = fs::symlink_metadata(root) else {
        return Usage::default();
    };
    let dev = top.dev();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(m) = entry.metadata() else { continue };
            usage.bytes = usage.bytes.saturating_add(m.blocks().saturating_mul(512));
            usage.inodes += 1;
            if m.is_dir() && m.dev() == dev {
                stack.push(entry.path());
            }
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn id(s: &str) -> VolumeId {
        VolumeId::parse(s).unwrap()
    }

    #[test]
    fn tree_usage_counts_entries_and_allocated_bytes() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/f"), vec![1u8; 64 * 1024]).unwrap();
        let u = tree_usage(dir.path());
        assert_eq!(u.inodes, 2);
        assert!(u.bytes >= 64 * 1024, "{u:?}");
        assert_eq!(tree_usage(&dir.path().join("missing")), Usage::default());
    }

    static WALKS: AtomicUsize = AtomicUsize::new(0);
    /// Records the thread it ran on in the walked folder, then counts.
    fn counting_walker(root: &Path) -> Usage {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        let _ = fs::write(root.join("walked-on"), name);
        WALKS.fetch_add(1, Ordering::SeqCst);
        Usage {
            bytes: 4096,
            inodes: 1,
        }
    }

    #[tokio::test]
    async fn walks_run_on_the_meters_thread_and_later_requests_use_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let meter = UsageMeter::with_walker(counting_walker);
        let v = id("walked");
        let before = WALKS.load(Ordering::SeqCst);
        let first = meter
            .measure(&v, dir.path().to_owned(), Duration::from_secs(60))
            .await;
        assert_eq!(first.bytes, 4096);
        assert_eq!(
            fs::read_to_string(dir.path().join("walked-on")).unwrap(),
            THREAD_NAME,
            "the tree is walked by the meter, not by the requesting thread"
        );
        // Within max_age: answered from the cache, no second walk.
        for _ in 0..5 {
            meter
                .measure(&v, dir.path().to_owned(), Duration::from_secs(60))
                .await;
        }
        assert_eq!(WALKS.load(Ordering::SeqCst) - before, 1);
        assert_eq!(meter.cached(&v), Some(first));
        meter.forget(&v);
        assert_eq!(meter.cached(&v), None);
    }

    fn walker_failing_on_one_root(root: &Path) -> Usage {
        assert!(root != Path::new("/panic"), "a walk failed");
        Usage {
            bytes: 1,
            inodes: 1,
        }
    }

    #[tokio::test]
    async fn a_walk_that_panics_neither_hangs_its_caller_nor_stops_the_meter() {
        let meter = UsageMeter::with_walker(walker_failing_on_one_root);
        let max = Duration::from_secs(60);
        let failed = meter.measure(&id("p1"), PathBuf::from("/panic"), max).await;
        assert_eq!(failed, Usage::default(), "answered, with nothing known");
        assert_eq!(meter.cached(&id("p1")), None);
        let next = meter.measure(&id("p2"), PathBuf::from("/ok"), max).await;
        assert_eq!(next.bytes, 1, "the meter goes on after a failed walk");
    }

    #[tokio::test]
    async fn a_volume_just_created_is_known_empty_without_a_walk() {
        let meter = UsageMeter::with_walker(|_| panic!("no walk expected"));
        let v = id("fresh");
        meter.set_empty(&v);
        let u = meter
            .measure(&v, PathBuf::from("/nonexistent"), Duration::from_secs(60))
            .await;
        assert_eq!(u, Usage::default());
    }
}
