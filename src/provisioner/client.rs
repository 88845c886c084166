//! The agent's Kubernetes client: kube-rs's default stack plus a client-side
//! token bucket (QPS and burst) and the count of the requests it sends
//! ([`crate::metrics::apiserver`]).
//!
//! kube-rs sends as fast as it is asked to. Hundreds of agents doing that at
//! once would hurt the apiserver, so the agent limits itself; the defaults
//! are high enough that hundreds of claims provision in seconds (upstream's
//! 5 QPS default is what makes large StatefulSets slow to bind).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::metrics::{Metrics, apiserver};

/// A token bucket: `qps` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    qps: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps: qps.max(0.001),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits until a token is free and takes it. Waiters are served in the
    /// order they arrive (tokio's Mutex is fair).
    pub async fn acquire(&self) {
        let mut state = self.state.lock().await;
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.qps).min(self.burst);
        *last = now;
        if *tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - *tokens) / self.qps);
            tokio::time::sleep(wait).await;
            *tokens = 1.0;
            *last = Instant::now();
        }
        *tokens -= 1.0;
    }
}

/// Paces every request the client sends.
#[derive(Clone, Debug)]
pub struct Pacing {
    bucket: Arc<TokenBucket>,
}

impl Pacing {
    pub fn new(qps: f64, burst: u32) -> Self {
        Self {
            bucket: Arc::new(TokenBucket::new(qps, burst)),
        }
    }
}

impl<S> Layer<S> for Pacing {
    type Service = Paced<S>;
    fn layer(&self, inner: S) -> Paced<S> {
        Paced {
            inner,
            pacing: self.clone(),
        }
    }
}

pub struct Paced<S> {
    inner: S,
    pacing: Pacing,
}

impl<S, R> Service<R> for Paced<S>
where
    S: Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        // The inner future does nothing until polled, so waiting for the
        // token before polling it delays the request itself.
        let fut = self.inner.call(req);
        let pacing = self.pacing.clone();
        Box::pin(async move {
            pacing.bucket.acquire().await;
            fut.await
        })
    }
}

/// Builds a client from the environment (in-cluster, or KUBECONFIG), paced
/// by `pacing` and counted in `metrics`: a provisioner restarted after a
/// failure keeps the agent's one budget and its counts.
pub async fn build(pacing: &Pacing, metrics: &Arc<Metrics>) -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    // Counted inside the pacing: what is counted was sent, not queued.
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&apiserver::layer(metrics.clone()))
        .with_layer(pacing)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_a_burst_then_paces_at_qps() {
        let bucket = TokenBucket::new(10.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            bucket.acquire().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(1),
            "burst must not wait"
        );
        for _ in 0..10 {
            bucket.acquire().await;
        }
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(990) && waited <= Duration::from_millis(1100),
            "10 tokens at 10 qps after the burst took {waited:?}"
        );
    }
}
