//! Volume ids: validated before they touch a path, and mapped to an on-disk
//! folder name that can never escape the pool.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest id accepted. The CSI spec (§ CreateVolume, "name") requires
/// plugins to accept names of at least 128 bytes, and csi-sanity probes that
/// exact length.
pub const MAX_ID_LEN: usize = 128;

/// Longest file name most Linux filesystems accept (NAME_MAX).
const NAME_MAX: usize = 255;

/// Why a volume id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("volume id is empty")]
    Empty,
    #[error("volume id {id:?} is {len} bytes long, the limit is {MAX_ID_LEN}")]
    TooLong { id: String, len: usize },
    #[error("volume id {id:?} contains {what}; ids are printable ASCII without '/' or '..'")]
    Forbidden { id: String, what: &'static str },
}

/// A validated volume id. Equal to the CreateVolume name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeId(String);

impl VolumeId {
    /// Validates `raw`: printable ASCII (no space, no control bytes, no NUL),
    /// no `/`, no `..`, at most [`MAX_ID_LEN`] bytes.
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        if raw.is_empty() {
            return Err(IdError::Empty);
        }
        // Report the shape of an over-long id without echoing all of it.
        let shown = || raw.chars().take(MAX_ID_LEN).collect::<String>();
        if raw.len() > MAX_ID_LEN {
            return Err(IdError::TooLong {
                id: shown(),
                len: raw.len(),
            });
        }
        let forbidden = |what| Err(IdError::Forbidden { id: shown(), what });
        if raw.contains('\0') {
            return forbidden("a NUL byte");
        }
        if raw.contains('/') {
            return forbidden("'/'");
        }
        if raw.contains("..") {
            return forbidden("'..'");
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return forbidden("a byte that is not printable ASCII");
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The folder name of this volume inside its pool.
    ///
    /// Letters, digits, `-` and `_` are kept; `.` is kept except in first
    /// position (so no name is hidden, `.` or `..`, and none collides with the
    /// pool's `.tmp-`/`.del-` work folders); every other byte becomes `%XX`.
    /// The mapping is injective, so two ids never share a folder.
    pub fn folder_name(&self) -> Result<String, IdError> {
        let mut out = String::with_capacity(self.0.len());
        for (i, b) in self.0.bytes().enumerate() {
            match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => out.push(char::from(b)),
                b'.' if i > 0 => out.push('.'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        if out.len() > NAME_MAX {
            return Err(IdError::Forbidden {
                id: self.0.clone(),
                what: "so many special characters that its folder name would exceed 255 bytes",
            });
        }
        Ok(out)
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for VolumeId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}

impl From<VolumeId> for String {
    fn from(id: VolumeId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_provisioner_names_and_keeps_them_as_folder_names() {
        let id = VolumeId::parse("pvc-0b7c5a4e-1f0e-4d4f-9a51-5b8f5a0e9c11").unwrap();
        assert_eq!(id.folder_name().unwrap(), id.as_str());
    }

    #[test]
    fn refuses_evil_ids() {
        for evil in [
            "",
            "../../etc",
            "..",
            "a/b",
            "/etc",
            "a\0b",
            "a b",
            "tab\there",
            "é",
        ] {
            assert!(VolumeId::parse(evil).is_err(), "{evil:?} was accepted");
        }
        assert!(matches!(
            VolumeId::parse(&"a".repeat(129)),
            Err(IdError::TooLong { len: 129, .. })
        ));
        assert!(VolumeId::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn folder_names_are_injective_and_never_hidden() {
        let a = VolumeId::parse(".x").unwrap().folder_name().unwrap();
        let b = VolumeId::parse("%2Ex").unwrap().folder_name().unwrap();
        assert_eq!(a, "%2Ex");
        assert_eq!(b, "%252Ex");
        assert_ne!(a, b);
        assert_eq!(
            VolumeId::parse("a.b:c").unwrap().folder_name().unwrap(),
            "a.b%3Ac"
        );
        let worst = VolumeId::parse(&"%".repeat(128)).unwrap();
        assert!(worst.folder_name().is_err());
    }
}
