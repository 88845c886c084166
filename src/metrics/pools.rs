//! The pool gauges, read from the store at each scrape (a collector, not
//! gauges kept up to date), so that they are never stale: bytes by pool and
//! backend, and volumes by pool, backend and state.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::storage::PoolStats;

type Source = Box<dyn Fn() -> Vec<PoolStats> + Send + Sync>;

pub(super) struct Pools(Source);

impl Pools {
    pub(super) fn new(source: impl Fn() -> Vec<PoolStats> + Send + Sync + 'static) -> Pools {
        Pools(Box::new(source))
    }
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pools")
    }
}

/// The byte gauges: name (before `_bytes`), help, value.
type ByteGauge = (&'static str, &'static str, fn(&PoolStats) -> u64);

const BYTES: [ByteGauge; 5] = [
    ("pool_capacity", "Size of the pool's filesystem.", |s| {
        s.size
    }),
    (
        "pool_free",
        "Available space of the pool's filesystem (what an unprivileged writer may use).",
        |s| s.free,
    ),
    (
        "pool_available",
        "What a new volume may still be given: free space less the pool's reserve and what volumes and snapshots were promised and have not taken (GetCapacity's answer).",
        |s| s.available,
    ),
    (
        "pool_promised",
        "The sizes of the pool's volumes, summed.",
        |s| s.promised,
    ),
    (
        "pool_used",
        "What the pool's volumes occupy on its filesystem.",
        |s| s.used,
    ),
];

impl Collector for Pools {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = (self.0)();
        for (name, help, value) in BYTES {
            let mut family =
                encoder.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?;
            for s in &stats {
                let labels = [("pool", s.pool.as_str()), ("backend", s.backend.as_str())];
                family.encode_family(&labels)?.encode_gauge(&value(s))?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "pool_volumes",
            "Volumes of the pool by state, as their node records say: idle, staged, published (unknown: unreadable record).",
            None,
            MetricType::Gauge,
        )?;
        for s in &stats {
            for (state, n) in &s.volumes {
                let labels = [
                    ("pool", s.pool.as_str()),
                    ("backend", s.backend.as_str()),
                    ("state", state.as_str()),
                ];
                family.encode_family(&labels)?.encode_gauge(n)?;
            }
        }
        Ok(())
    }
}
