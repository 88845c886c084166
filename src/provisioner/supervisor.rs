//! Keeps the provisioner running beside the CSI plugin.
//!
//! The provisioner is a client of the node plugin, not a part kubelet
//! depends on: a fault of it (a state directory it cannot write, an
//! apiserver that is down, a bug) must never stop CSI serving or kubelet
//! registration. So the agent runs it under [`supervise`]: a failed run is
//! logged and started again after an exponential backoff, and its state is
//! kept in [`Status`] for readiness (never for liveness: restarting the
//! agent would take the plugin down for a provisioner fault).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use tokio::time::Instant;

use super::Error;

/// The first delay before a failed provisioner is started again.
pub const MIN_DELAY: Duration = Duration::from_secs(1);
/// The longest delay; a run that lasted longer than this was healthy, and
/// the delays after its failure start again from [`MIN_DELAY`].
pub const MAX_DELAY: Duration = Duration::from_secs(300);

/// What the provisioner is doing, as readiness reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// A run started and has not yet synced its watches.
    Starting,
    /// The current run has its watches synced and reconciles.
    Serving,
    /// The last run failed; the next starts after `retry_in`. Kept until a
    /// later run is serving, so that readiness does not flap between fast
    /// failures.
    Failed {
        attempt: u32,
        error: String,
        retry_in: Duration,
    },
}

/// The provisioner's state, shared by the supervisor, the running
/// provisioner and the health endpoint.
#[derive(Debug)]
pub struct Status {
    state: Mutex<State>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::Starting),
        }
    }
}

impl Status {
    pub fn get(&self) -> State {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, state: State) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// Called by a run once its watches are synced.
    pub fn serving(&self) {
        self.set(State::Serving);
    }

    /// `Err(why)` while the provisioner is down after a failure.
    pub fn readiness(&self) -> Result<(), String> {
        match self.get() {
            State::Failed {
                attempt,
                error,
                retry_in,
            } => Err(format!(
                "provisioner failed (run {attempt}): {error}; restarting in {retry_in:?}"
            )),
            State::Starting | State::Serving => Ok(()),
        }
    }
}

/// The delays between restarts. backon (already in the tree through
/// kube-runtime) gives the exponential schedule with jitter, so that the
/// agents of many nodes that failed together (an apiserver outage) do not
/// come back in lockstep; the restart loop itself is ours, because it must
/// also start over after a healthy run, which a retry of one call cannot.
fn delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(MIN_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs `attempt()` until `shutdown` resolves, starting it again after each
/// failure (an error, a panic, or an end that nobody asked for). Each run is
/// its own task, so a panic in it is a failure like any other. A run is
/// expected to stop by itself on `shutdown`, which it is given too.
pub async fn supervise<F, Fut, S>(mut attempt: F, status: Arc<Status>, shutdown: S)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
    S: Future<Output = ()> + Clone,
{
    let mut schedule = delays();
    let mut run = 0u32;
    loop {
        run += 1;
        let started = Instant::now();
        let error = match tokio::spawn(attempt()).await {
            Ok(Ok(())) if shutdown.clone().now_or_never().is_some() => return,
            Ok(Ok(())) => "it stopped without being asked to".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("it panicked or was cancelled: {e}"),
        };
        if started.elapsed() > MAX_DELAY {
            schedule = delays();
        }
        let retry_in = schedule.next().unwrap_or(MAX_DELAY);
        tracing::error!(
            run,
            error = %error,
            retry_in = ?retry_in,
            "provisioner failed; CSI keeps serving, the provisioner restarts after the delay"
        );
        status.set(State::Failed {
            attempt: run,
            error,
            retry_in,
        });
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => {}
            _ = shutdown.clone() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The time is paused: the backoff sleeps pass at once, in order.
    #[tokio::test(start_paused = true)]
    async fn a_failing_provisioner_is_restarted_with_growing_delays() {
        let runs = Arc::new(AtomicU32::new(0));
        let status = Arc::new(Status::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        }
        .shared();
        let supervisor = tokio::spawn(supervise(
            {
                let runs = runs.clone();
                move || {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        match n {
                            1 => Err(Error::WatchEnded("StorageClasses")),
                            2 => panic!("a bug in run 2"),
                            3 => Ok(()),
                            _ => std::future::pending().await,
                        }
                    }
                }
            },
            status.clone(),
            shutdown,
        ));
        let begin = Instant::now();
        while runs.load(Ordering::SeqCst) < 4 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Three failures: an error, a panic, an unasked end; delays of at
        // least 1 s, 2 s and 4 s between them.
        assert!(
            begin.elapsed() >= Duration::from_secs(7),
            "{:?}",
            begin.elapsed()
        );
        match status.get() {
            State::Failed { attempt, error, .. } => {
                assert_eq!(attempt, 3);
                assert_eq!(error, "it stopped without being asked to");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            status
                .readiness()
                .unwrap_err()
                .contains("provisioner failed (run 3)")
        );
        status.serving();
        assert_eq!(status.readiness(), Ok(()));
        supervisor.abort();
        drop(stop);
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_ends_on_shutdown_ends_the_supervisor() {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        }
        .shared();
        let status = Arc::new(Status::default());
        let supervisor = tokio::spawn(supervise(
            {
                let shutdown = shutdown.clone();
                move || {
                    let shutdown = shutdown.clone();
                    async move {
                        shutdown.await;
                        Ok(())
                    }
                }
            },
            status.clone(),
            shutdown,
        ));
        stop.send(()).unwrap();
        supervisor.await.unwrap();
        assert_eq!(status.get(), State::Starting, "it never failed");
    }
}
