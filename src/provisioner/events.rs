//! Events for users, recorded off the provisioning path.
//!
//! An Event is a courtesy to whoever runs `kubectl describe`; a claim must
//! not wait for it. Reconcilers hand events to a bounded queue and go on; one
//! task records them in the order they were posted (so `Provisioning` comes
//! before `ProvisioningSucceeded`), through the agent's rate-limited client.
//! When the queue is full (an apiserver that stalls), events are dropped and
//! counted (`stead_events_dropped_total`, and in the log), never waited for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Events waiting to be recorded before new ones are dropped.
const QUEUE: usize = 4096;

/// The sending side, shared by every reconciler.
pub(crate) struct Events {
    tx: mpsc::Sender<(ObjectReference, Event)>,
    dropped: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Events {
    /// The sender, and the task that records what is sent (run it until
    /// shutdown).
    pub(crate) fn new(
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> (Events, impl Future<Output = ()>) {
        let (tx, rx) = mpsc::channel::<(ObjectReference, Event)>(QUEUE);
        let not_recorded = metrics.clone();
        let drain = async move {
            let mut rx = tokio_stream::wrappers::ReceiverStream::new(rx);
            while let Some((reference, ev)) = rx.next().await {
                if let Err(e) = recorder.publish(&ev, &reference).await {
                    not_recorded.event_dropped("not_recorded");
                    tracing::warn!(
                        object = reference.name.as_deref().unwrap_or_default(),
                        reason = %ev.reason,
                        error = %e,
                        "could not record event"
                    );
                }
            }
        };
        let events = Events {
            tx,
            dropped: AtomicU64::new(0),
            metrics,
        };
        (events, drain)
    }

    /// The sender, and the queue it sends to, unread: for tests that look at
    /// what was posted.
    #[cfg(test)]
    pub(crate) fn queued(
        metrics: Arc<Metrics>,
    ) -> (Events, mpsc::Receiver<(ObjectReference, Event)>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let events = Events {
            tx,
            dropped: AtomicU64::new(0),
            metrics,
        };
        (events, rx)
    }

    /// Queues an event on `reference`; never waits.
    pub(crate) fn post(
        &self,
        reference: ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        if self.tx.try_send((reference, ev)).is_err() {
            self.metrics.event_dropped("queue_full");
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, reason, "event queue full; events dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_waiting() {
        let (tx, _rx) = mpsc::channel(1);
        let metrics = Arc::new(Metrics::new(Vec::new));
        let events = Events {
            tx,
            dropped: AtomicU64::new(0),
            metrics: metrics.clone(),
        };
        for _ in 0..3 {
            events.post(
                ObjectReference::default(),
                EventType::Normal,
                "Provisioning",
                "Provision",
                "x".into(),
            );
        }
        assert_eq!(events.dropped.load(Ordering::Relaxed), 2);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("stead_events_dropped_total{reason=\"queue_full\"} 2\n"),
            "{text}"
        );
    }
}
