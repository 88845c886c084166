//! Per-volume serialization: RPCs on one volume run one at a time, RPCs on
//! different volumes run in parallel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::storage::VolumeId;

type Table = Mutex<HashMap<VolumeId, Arc<AsyncMutex<()>>>>;

/// A table of per-volume locks; entries exist only while held or awaited.
#[derive(Debug, Default, Clone)]
pub struct VolumeLocks {
    table: Arc<Table>,
}

/// Holds the lock of one volume until dropped.
#[derive(Debug)]
pub struct VolumeGuard {
    guard: Option<OwnedMutexGuard<()>>,
    table: Arc<Table>,
    id: VolumeId,
}

impl VolumeLocks {
    /// Waits for, then takes, the lock of volume `id`.
    pub async fn lock(&self, id: &VolumeId) -> VolumeGuard {
        let m = {
            let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            t.entry(id.clone()).or_default().clone()
        };
        VolumeGuard {
            guard: Some(m.lock_owned().await),
            table: self.table.clone(),
            id: id.clone(),
        }
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the table still refers to the mutex: nobody holds or awaits it.
        if t.get(&self.id).is_some_and(|m| Arc::strong_count(m) == 1) {
            t.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_volume_is_serialized_and_table_is_emptied() {
        let locks = VolumeLocks::default();
        let id = VolumeId::parse("v").unwrap();
        let g = locks.lock(&id).await;
        let l2 = locks.clone();
        let id2 = id.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(&id2).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        // A different volume is not blocked.
        let _other = locks.lock(&VolumeId::parse("w").unwrap()).await;
        drop(g);
        waiter.await.unwrap();
        drop(_other);
        assert!(locks.table.lock().unwrap().is_empty());
    }
}
