//! Pools: a directory on a local filesystem plus the backend that lays
//! volumes out in it, and the capacity rules shared by both backends.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::kind::{AccessKind, BackendKind, FsType};

/// A pool as configured: `NAME:BACKEND:PATH[:reserve=AMOUNT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    pub backend: BackendKind,
    pub path: PathBuf,
    /// Free space of the pool's filesystem that Stead never promises.
    pub reserve: Reserve,
}

impl PoolSpec {
    /// A pool with the default reserve.
    pub fn new(name: &str, backend: BackendKind, path: impl Into<PathBuf>) -> PoolSpec {
        PoolSpec {
            name: name.to_owned(),
            backend,
            path: path.into(),
            reserve: Reserve::DEFAULT,
        }
    }

    /// This pool with another reserve.
    pub fn with_reserve(self, reserve: Reserve) -> PoolSpec {
        PoolSpec { reserve, ..self }
    }
}

/// What a pool keeps free of its filesystem: Stead's promises stop there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// A share of the filesystem's size, in percent (0 to 99).
    Percent(u8),
    /// A number of bytes.
    Bytes(u64),
}

impl Reserve {
    /// 15% of the filesystem. kubelet evicts pods under DiskPressure when a
    /// filesystem it watches falls below its default hard thresholds:
    /// `nodefs.available<10%` (the kubelet directory's filesystem) and
    /// `imagefs.available<15%` (the container runtime's). The default
    /// pools (`/var/lib/stead`) lie on the node's root filesystem, which on
    /// most nodes is both nodefs and imagefs, so the stricter of the two is
    /// the one that counts there. A pool on a disk of its own, which kubelet
    /// does not watch, can say `reserve=0`.
    pub const DEFAULT: Reserve = Reserve::Percent(15);

    /// The bytes kept free of a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            Reserve::Percent(p) => total / 100 * u64::from(p) + total % 100 * u64::from(p) / 100,
            Reserve::Bytes(n) => n,
        }
    }

    /// Parses `15%`, `0`, `512Mi`, `20Gi`, `1073741824`.
    pub fn parse(raw: &str) -> Result<Reserve, String> {
        let bad = || {
            format!(
                "reserve {raw:?} is neither a percentage (0% to 99%) nor a size (bytes, or with Ki, Mi, Gi, Ti)"
            )
        };
        if let Some(p) = raw.strip_suffix('%') {
            return match p.parse::<u8>() {
                Ok(n) if n < 100 && !p.starts_with('+') => Ok(Reserve::Percent(n)),
                _ => Err(bad()),
            };
        }
        let (digits, unit) = match raw.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => raw.split_at(i),
            None => (raw, ""),
        };
        let unit = match unit {
            "" => 1,
            "Ki" => KIB,
            "Mi" => MIB,
            "Gi" => GIB,
            "Ti" => 1024 * GIB,
            _ => return Err(bad()),
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit))
            .map(Reserve::Bytes)
            .ok_or_else(bad)
    }
}

impl fmt::Display for Reserve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reserve::Percent(p) => write!(f, "{p}%"),
            Reserve::Bytes(n) => write!(f, "{n}"),
        }
    }
}

/// The options that may follow a pool's path, each as `:KEY=VALUE`.
const RESERVE_OPTION: &str = "reserve=";

impl FromStr for PoolSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.trim().splitn(3, ':');
        let (Some(name), Some(backend), Some(rest)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "pool {s:?}: expected NAME:BACKEND:PATH[:reserve=AMOUNT], e.g. fast:image:/var/lib/stead/fast"
            ));
        };
        if name.is_empty()
            || name.len() > 63
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "pool {s:?}: name {name:?} must be 1-63 characters of a-z, 0-9, '-' or '_'"
            ));
        }
        let backend = match backend {
            "dir" => BackendKind::Dir,
            "image" => BackendKind::Image,
            other => {
                return Err(format!(
                    "pool {name}: backend {other:?} is unknown; use \"dir\" or \"image\""
                ));
            }
        };
        // A path may hold colons; only a last part that starts with a known
        // option is one (so `a:dir:/x:y` is still the path `/x:y`).
        let (path, reserve) = match rest.rsplit_once(':') {
            Some((path, opt)) if opt.starts_with(RESERVE_OPTION) => {
                let reserve = Reserve::parse(&opt[RESERVE_OPTION.len()..])
                    .map_err(|e| format!("pool {name}: {e}"))?;
                (path, reserve)
            }
            _ => (rest, Reserve::DEFAULT),
        };
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!(
                "pool {name}: path {} must be absolute",
                path.display()
            ));
        }
        Ok(PoolSpec {
            name: name.to_owned(),
            backend,
            path,
            reserve,
        })
    }
}

impl fmt::Display for PoolSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.name, self.backend, self.path.display())?;
        if self.reserve != Reserve::DEFAULT {
            write!(f, ":{RESERVE_OPTION}{}", self.reserve)?;
        }
        Ok(())
    }
}

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// Capacities are multiples of this: the block size of the filesystems
/// Stead creates, and a multiple of the 512-byte sector loop devices need.
pub const GRANULE: u64 = 4 * KIB;
/// Size of a volume whose request names no size.
pub const DEFAULT_SIZE: u64 = GIB;

/// The smallest volume a backend can hold with the given access.
///
/// ext4 fits in 16 MiB with room for a journal; mkfs.xfs (xfsprogs ≥ 5.19)
/// refuses filesystems under 300 MiB; a directory or a raw block device has no
/// floor beyond one granule.
pub fn minimum_size(backend: BackendKind, access: Option<AccessKind>) -> u64 {
    match (backend, access) {
        (BackendKind::Dir, _) => GRANULE,
        (BackendKind::Image, Some(AccessKind::Block)) => MIB,
        (
            BackendKind::Image,
            Some(AccessKind::Mount {
                fs_type: FsType::Xfs,
            }),
        ) => 300 * MIB,
        (BackendKind::Image, _) => 16 * MIB,
    }
}

/// Why a capacity range cannot be satisfied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("capacity_range: {field} is negative ({value})")]
    Negative { field: &'static str, value: i64 },
    #[error("capacity_range: limit_bytes {limit} is below required_bytes {required}")]
    LimitBelowRequired { required: i64, limit: i64 },
    #[error(
        "capacity_range: no size in [{required}, {limit}] bytes fits: the minimum is {minimum} bytes in multiples of {GRANULE}"
    )]
    Unsatisfiable {
        required: u64,
        limit: u64,
        minimum: u64,
    },
}

/// Checks a CSI capacity range for well-formedness; `(required, limit)` with
/// 0 meaning "unset".
pub fn check_range(required: i64, limit: i64) -> Result<(u64, u64), RangeError> {
    if required < 0 {
        return Err(RangeError::Negative {
            field: "required_bytes",
            value: required,
        });
    }
    if limit < 0 {
        return Err(RangeError::Negative {
            field: "limit_bytes",
            value: limit,
        });
    }
    if limit != 0 && limit < required {
        return Err(RangeError::LimitBelowRequired { required, limit });
    }
    Ok((required.unsigned_abs(), limit.unsigned_abs()))
}

/// Chooses the size of a new volume.
///
/// Rounding rule: the size is `required_bytes` (or [`DEFAULT_SIZE`] when
/// unset, capped by `limit_bytes`), raised to the backend's minimum, then
/// rounded *up* to a multiple of [`GRANULE`] (4 KiB). If that exceeds a set
/// `limit_bytes`, the request cannot be met.
pub fn plan_size(required: u64, limit: u64, minimum: u64) -> Result<u64, RangeError> {
    let wanted = if required == 0 {
        if limit != 0 {
            DEFAULT_SIZE.min(limit)
        } else {
            DEFAULT_SIZE
        }
    } else {
        required
    };
    let size = round_up(wanted.max(minimum));
    if limit != 0 && size > limit {
        return Err(RangeError::Unsatisfiable {
            required,
            limit,
            minimum,
        });
    }
    Ok(size)
}

/// Whether an existing volume of `size` satisfies a range (for idempotency).
pub fn fits(size: u64, required: u64, limit: u64) -> bool {
    size >= required && (limit == 0 || size <= limit)
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(GRANULE).saturating_mul(GRANULE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pool_specs() {
        let p: PoolSpec = "fast:image:/var/lib/stead/fast".parse().unwrap();
        assert_eq!(p.name, "fast");
        assert_eq!(p.backend, BackendKind::Image);
        assert_eq!(p.path, PathBuf::from("/var/lib/stead/fast"));
        assert!("fast:zfs:/x".parse::<PoolSpec>().is_err());
        assert!("fast:dir:relative".parse::<PoolSpec>().is_err());
        assert!("Fast:dir:/x".parse::<PoolSpec>().is_err());
        assert!("fast:dir".parse::<PoolSpec>().is_err());
        // A colon in the path is kept.
        let p: PoolSpec = "a:dir:/x:y".parse().unwrap();
        assert_eq!(p.path, PathBuf::from("/x:y"));
        assert_eq!(p.reserve, Reserve::DEFAULT);
    }

    #[test]
    fn a_pool_may_name_its_reserve_after_its_path() {
        let p: PoolSpec = "a:dir:/x:y:reserve=5%".parse().unwrap();
        assert_eq!(p.path, PathBuf::from("/x:y"));
        assert_eq!(p.reserve, Reserve::Percent(5));
        assert_eq!(p.to_string(), "a:dir:/x:y:reserve=5%");
        let p: PoolSpec = "a:image:/x:reserve=20Gi".parse().unwrap();
        assert_eq!(p.reserve, Reserve::Bytes(20 * GIB));
        let p: PoolSpec = "a:image:/x:reserve=0".parse().unwrap();
        assert_eq!(p.reserve, Reserve::Bytes(0));
        assert_eq!(
            "a:image:/x".parse::<PoolSpec>().unwrap().to_string(),
            "a:image:/x"
        );
        for bad in [
            "100%",
            "-1%",
            "+5%",
            "5 %",
            "1.5%",
            "12Pi",
            "Gi",
            "",
            "99999999999Ti",
        ] {
            let e = format!("a:dir:/x:reserve={bad}")
                .parse::<PoolSpec>()
                .unwrap_err();
            assert!(e.contains("pool a: reserve"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_reserve_is_a_share_of_the_filesystem_or_a_size() {
        assert_eq!(Reserve::DEFAULT.bytes(100 * GIB), 15 * GIB);
        assert_eq!(Reserve::Percent(10).bytes(1000), 100);
        assert_eq!(
            Reserve::Percent(15).bytes(u64::MAX),
            u64::MAX / 100 * 15 + 15 * 15 / 100
        );
        assert_eq!(Reserve::Percent(0).bytes(GIB), 0);
        assert_eq!(Reserve::Bytes(7).bytes(GIB), 7);
    }

    #[test]
    fn sizes_round_up_to_4k_and_respect_limits() {
        assert_eq!(plan_size(0, 0, GRANULE).unwrap(), GIB);
        assert_eq!(plan_size(0, MIB, GRANULE).unwrap(), MIB);
        assert_eq!(plan_size(1, 0, GRANULE).unwrap(), GRANULE);
        assert_eq!(plan_size(GRANULE + 1, 0, GRANULE).unwrap(), 2 * GRANULE);
        // required == limit, a multiple of the granule: exactly that.
        assert_eq!(plan_size(64 * MIB, 64 * MIB, 16 * MIB).unwrap(), 64 * MIB);
        // Raised to the minimum.
        assert_eq!(plan_size(MIB, 0, 16 * MIB).unwrap(), 16 * MIB);
        assert!(plan_size(MIB, 2 * MIB, 16 * MIB).is_err());
        assert!(plan_size(GRANULE + 1, GRANULE + 2, GRANULE).is_err());
    }

    #[test]
    fn range_checks() {
        assert!(matches!(
            check_range(10, 5),
            Err(RangeError::LimitBelowRequired { .. })
        ));
        assert!(check_range(-1, 0).is_err());
        assert_eq!(check_range(5, 0).unwrap(), (5, 0));
        assert!(fits(10, 5, 0));
        assert!(!fits(10, 5, 8));
        assert!(!fits(4, 5, 0));
    }
}
