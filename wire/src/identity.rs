//! Disk ids, and how a shipper's certificate names the disks it may write.
//!
//! A disk id is the name a protected disk has at the recovery site: its
//! replica's folder, its NBD export name. A shipper's certificate carries one
//! subject alternative name of type URI per disk it is enrolled for,
//! `urn:blockship:disk:<id>`; the target refuses a hello for any other disk.

use crate::error::WireError;

/// Longest disk id.
pub const MAX_DISK_ID_LEN: usize = 128;
/// Prefix of the certificate URI naming an enrolled disk.
pub const DISK_URI_PREFIX: &str = "urn:blockship:disk:";

/// Check a disk id: 1..=128 ASCII letters, digits, '.', '_' or '-', not
/// starting with '.' or '-' (it names a folder and an export).
pub fn validate_disk_id(id: &str) -> Result<(), WireError> {
    let bad = |why: &str| {
        Err(WireError::invalid(
            "disk id",
            format!("{id:?}: {why} (use 1 to 128 letters, digits, '.', '_' or '-', not starting with '.' or '-')"),
        ))
    };
    if id.is_empty() || id.len() > MAX_DISK_ID_LEN {
        return bad("wrong length");
    }
    if id.starts_with('.') || id.starts_with('-') {
        return bad("bad first character");
    }
    if !id
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return bad("bad character");
    }
    Ok(())
}

/// The certificate URI that enrolls `id`.
pub fn disk_uri(id: &str) -> String {
    format!("{DISK_URI_PREFIX}{id}")
}

/// The disk id a certificate URI enrolls, if it is one.
pub fn disk_from_uri(uri: &str) -> Option<&str> {
    let id = uri.strip_prefix(DISK_URI_PREFIX)?;
    validate_disk_id(id).ok().map(|()| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["db", "vm-01.disk_0", "A", &"x".repeat(128)] {
            assert!(validate_disk_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a b", "é", &"x".repeat(129), ".."] {
            assert!(validate_disk_id(bad).is_err(), "{bad}");
        }
        assert_eq!(disk_from_uri(&disk_uri("db-1")), Some("db-1"));
        assert_eq!(disk_from_uri("urn:blockship:disk:../x"), None);
        assert_eq!(disk_from_uri("https://x"), None);
    }
}
