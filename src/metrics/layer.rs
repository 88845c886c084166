//! The one tower layer of the metrics: around each HTTP request of the
//! service it wraps, an [`Observer`] sees the request go out and its
//! response (or its failure) come back. The CSI server's RPCs and the kube
//! client's requests are both counted through it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a metric records of one request.
pub trait Observer: Clone + Send + 'static {
    /// What is kept from the request until its response.
    type Started: Send + 'static;
    fn start(&self, method: &http::Method, uri: &http::Uri) -> Self::Started;
    /// `response`: its status and headers, `None` when none came.
    fn end(&self, started: Self::Started, response: Option<(http::StatusCode, &http::HeaderMap)>);
}

#[derive(Clone)]
pub struct ObserveLayer<O>(pub(super) O);

impl<S, O: Clone> tower::Layer<S> for ObserveLayer<O> {
    type Service = Observed<S, O>;
    fn layer(&self, inner: S) -> Observed<S, O> {
        Observed {
            inner,
            observer: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observed<S, O> {
    inner: S,
    observer: O,
}

impl<S, O, B, R> tower::Service<http::Request<B>> for Observed<S, O>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    O: Observer,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = self.observer.start(req.method(), req.uri());
        // The inner future does nothing until polled: what wraps this one
        // (the client's pacing) may still hold the request back.
        let fut = self.inner.call(req);
        let observer = self.observer.clone();
        Box::pin(async move {
            let res = fut.await;
            observer.end(
                started,
                res.as_ref().ok().map(|r| (r.status(), r.headers())),
            );
            res
        })
    }
}
