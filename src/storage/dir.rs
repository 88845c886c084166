//! The `dir` backend: a plain directory per volume, bind-mounted into the
//! pod. Capacity is accounted against the pool (see [`super::Store`]), not
//! enforced by the filesystem.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

/// Name of the data directory inside a volume folder.
pub const DATA_DIR: &str = "data";

/// Creates the (empty) data directory of a new volume. Mode 0777 like an
/// emptyDir, so a pod running as any user can write; the volume folder
/// around it stays 0700.
pub fn create_data_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(0o777).create(path)?;
    // The umask trimmed the mode at creation; set it exactly.
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
}
