//! Test and demo certificates (`ferry-ctl gen-certs`): a CA and two peer
//! certificates it signs, made with rcgen.
//!
//! Both peer certificates may act as client and as server (a host is the
//! source of one move and the destination of the next). The destination's
//! certificate names `dest`, `localhost`, `127.0.0.1` and `::1`, plus any
//! extra names given; the source's names `source`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// The name in the source's certificate.
pub const SOURCE_NAME: &str = "source";
/// The names every destination certificate carries.
pub const DEST_NAMES: [&str; 4] = ["dest", "localhost", "127.0.0.1", "::1"];

/// What [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct Generated {
    /// `ca.pem`.
    pub ca: PathBuf,
    /// `dest.pem` and `dest.key`.
    pub dest: (PathBuf, PathBuf),
    /// `source.pem` and `source.key`.
    pub source: (PathBuf, PathBuf),
    /// The names in the destination's certificate.
    pub dest_names: Vec<String>,
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// Writes `ca.pem`, `dest.pem`, `dest.key`, `source.pem` and `source.key`
/// into `dir` (created if missing); keys are mode 0600. `extra_dest_names`
/// are added to the destination certificate's names (its addresses on
/// other networks, its host name).
pub fn generate(dir: &Path, extra_dest_names: &[String]) -> Result<Generated, String> {
    std::fs::create_dir_all(dir).map_err(|e| err(&format!("creating {}", dir.display()), e))?;
    let ca_key = KeyPair::generate().map_err(|e| err("CA key", e))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| err("CA", e))?;
    // A CA of its own name: two `gen-certs` runs make two distinct CAs.
    let tag = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        ^ u128::from(std::process::id());
    ca.distinguished_name
        .push(DnType::CommonName, format!("Ferry migration CA {tag:x}"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| err("CA", e))?;

    let mut dest_names: Vec<String> = DEST_NAMES.iter().map(|s| s.to_string()).collect();
    for n in extra_dest_names {
        if !dest_names.contains(n) {
            dest_names.push(n.clone());
        }
    }
    let peer = |names: Vec<String>, cn: &str| -> Result<(String, String), String> {
        let key = KeyPair::generate().map_err(|e| err(cn, e))?;
        let mut p = CertificateParams::new(names).map_err(|e| err(cn, e))?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p
            .signed_by(&key, &ca_cert, &ca_key)
            .map_err(|e| err(cn, e))?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (dest_pem, dest_key) = peer(dest_names.clone(), "dest")?;
    let (source_pem, source_key) = peer(vec![SOURCE_NAME.to_string()], SOURCE_NAME)?;

    let out = Generated {
        ca: dir.join("ca.pem"),
        dest: (dir.join("dest.pem"), dir.join("dest.key")),
        source: (dir.join("source.pem"), dir.join("source.key")),
        dest_names,
    };
    write(&out.ca, ca_cert.pem().as_bytes(), 0o644)?;
    write(&out.dest.0, dest_pem.as_bytes(), 0o644)?;
    write(&out.dest.1, dest_key.as_bytes(), 0o600)?;
    write(&out.source.0, source_pem.as_bytes(), 0o644)?;
    write(&out.source.1, source_key.as_bytes(), 0o600)?;
    Ok(out)
}

/// Writes a new file with `mode` from the start (a key is never readable
/// by others, not even for a moment); an existing file is replaced.
fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| err(&format!("creating {}", path.display()), e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| err(&format!("writing {}", path.display()), e))
}
