//! `nbd-target pki`: a small certificate authority for one recovery site.
//!
//! `init` makes the CA (`ca.pem`, `ca-key.pem`) and the target's own TLS
//! folder (`target/`); `issue` makes a shipper's TLS folder whose
//! certificate names, as `urn:blockship:disk:<id>` URIs, the disks its
//! holder may write. Private keys are written with mode 0600 and never
//! overwritten.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::{Error, Result};

/// How long certificates are valid by default.
pub const DEFAULT_DAYS: u32 = 825;
/// How long the CA is valid.
pub const CA_DAYS: u32 = 3650;

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            what: if source.kind() == std::io::ErrorKind::AlreadyExists {
                "refusing to overwrite an existing file (remove it first if you mean it)"
            } else {
                "creating"
            },
            source,
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            what: "writing",
            source,
        })
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        what: "creating the folder",
        source,
    })
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
}

fn name(p: &mut CertificateParams, cn: &str) {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "blockship");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
}

/// Make a CA in `dir` and the target's TLS folder in `dir/target`, whose
/// certificate is valid for `localhost`, 127.0.0.1, ::1 and `sans`.
pub fn init(dir: &Path, sans: &[String]) -> Result<()> {
    mkdir(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    name(&mut ca, "blockship recovery site CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca, CA_DAYS);
    let ca_cert = ca.self_signed(&ca_key)?;
    write_file(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), 0o600)?;
    write_file(&dir.join("ca.pem"), &ca_cert.pem(), 0o644)?;

    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    names.extend(sans.iter().cloned());
    let mut p = CertificateParams::new(names)?;
    name(&mut p, "blockship nbd-target");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p, DEFAULT_DAYS);
    let key = KeyPair::generate()?;
    let issuer = Issuer::new(ca, ca_key);
    let cert = p.signed_by(&key, &issuer)?;
    let out = dir.join("target");
    mkdir(&out)?;
    write_file(&out.join("key.pem"), &key.serialize_pem(), 0o600)?;
    write_file(&out.join("cert.pem"), &cert.pem(), 0o644)?;
    write_file(&out.join("ca.pem"), &ca_cert.pem(), 0o644)?;
    Ok(())
}

/// Make a shipper's TLS folder in `out`: a certificate named `name` that may
/// write `disks`, valid for `days`.
pub fn issue(dir: &Path, name_: &str, disks: &[String], out: &Path, days: u32) -> Result<()> {
    if disks.is_empty() {
        return Err(Error::Invalid(
            "give at least one --disk: a shipper certificate names the disks it may write".into(),
        ));
    }
    for d in disks {
        wire::identity::validate_disk_id(d).map_err(|e| Error::Invalid(e.to_string()))?;
    }
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).map_err(|source| Error::Io {
            path: dir.join(f),
            what: "reading (run `nbd-target pki init --dir` first)",
            source,
        })
    };
    let ca_pem = read("ca.pem")?;
    let ca_key = KeyPair::from_pem(&read("ca-key.pem")?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let mut p = CertificateParams::default();
    name(&mut p, name_);
    for d in disks {
        let uri = wire::identity::disk_uri(d);
        p.subject_alt_names.push(SanType::URI(uri.try_into()?));
    }
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p, days);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    mkdir(out)?;
    write_file(&out.join("key.pem"), &key.serialize_pem(), 0o600)?;
    write_file(&out.join("cert.pem"), &cert.pem(), 0o644)?;
    write_file(&out.join("ca.pem"), &ca_pem, 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_issue_make_loadable_folders_with_private_keys() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pki = d.path().join("pki");
        init(&pki, &["replica.example".into()]).unwrap_or_else(|e| panic!("{e}"));
        let sh = d.path().join("sh");
        issue(&pki, "web-01", &["db".into(), "logs".into()], &sh, 30)
            .unwrap_or_else(|e| panic!("{e}"));
        use std::os::unix::fs::PermissionsExt;
        for k in [
            pki.join("ca-key.pem"),
            pki.join("target/key.pem"),
            sh.join("key.pem"),
        ] {
            let m = std::fs::metadata(&k)
                .unwrap_or_else(|e| panic!("{e}"))
                .permissions()
                .mode();
            assert_eq!(m & 0o777, 0o600, "{}", k.display());
        }
        let t = transport::TlsDir::load(&pki.join("target")).unwrap_or_else(|e| panic!("{e}"));
        t.server_config().unwrap_or_else(|e| panic!("{e}"));
        let s = transport::TlsDir::load(&sh).unwrap_or_else(|e| panic!("{e}"));
        s.client_config().unwrap_or_else(|e| panic!("{e}"));
        let id = transport::tls::peer_identity(&s.chain[0]);
        assert_eq!(id.disks, vec!["db".to_string(), "logs".to_string()]);
        assert_eq!(id.name, "web-01");
        // Never overwrites.
        assert!(init(&pki, &[]).is_err());
        assert!(issue(&pki, "x", &[], &d.path().join("y"), 1).is_err());
        assert!(issue(&pki, "x", &["../etc".into()], &d.path().join("y"), 1).is_err());
    }
}
