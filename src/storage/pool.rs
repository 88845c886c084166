//! Pools: a directory on a local filesystem plus the backend that lays
//! volumes out in it, and the capacity rules shared by both backends.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::kind::{AccessKind, BackendKind, FsType};

/// A pool as configured: `NAME:BACKEND:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    pub backend: BackendKind,
    pub path: PathBuf,
}

impl FromStr for PoolSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.trim().splitn(3, ':');
        let (Some(name), Some(backend), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "pool {s:?}: expected NAME:BACKEND:PATH, e.g. fast:image:/var/lib/stead/fast"
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
        })
    }
}

impl fmt::Display for PoolSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.name, self.backend, self.path.display())
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
