//! Mutual TLS settings from PEM files, and the two handshakes.
//!
//! Both sides present a certificate and verify the other's against one CA
//! (QEMU's `tls-creds-x509` convention). The source also checks that the
//! destination's certificate is valid for the name it dialled (or
//! `--tls-server-name`); the destination checks that the source's
//! certificate carries one of the names it allows (`--tls-allow`, QEMU's
//! `tls-authz`). TLS 1.3 only, AES-GCM first (the CPU's AES instructions),
//! no session resumption (every connection shows its certificate, which is
//! what binds the fault connection to the control connection).

use std::fmt;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use nix::poll::PollFlags;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{ring, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, Connection, DigitallySignedStruct,
    DistinguishedName, OtherError, RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::tls::{wait, TlsStream};
use crate::Conn;

/// A certificate, its key and the CA that signs the peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) the peer's certificate must chain to (PEM).
    pub ca: PathBuf,
}

/// What is wrong with the TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {why}")]
    File {
        /// "certificate", "key" or "CA".
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// rustls refused the combination.
    #[error("TLS settings: {0}")]
    Config(String),
    /// A name is not a DNS name or an IP address.
    #[error("{0:?} is not a DNS name or IP address")]
    Name(String),
}

fn file_err(what: &'static str, path: &Path, why: impl fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path, e))?;
    if certs.is_empty() {
        return Err(file_err(what, path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err("key", path, e))
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs("CA", path)? {
        roots
            .add(c)
            .map_err(|e| file_err("CA", path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The ring provider with AES-128-GCM first (then AES-256-GCM, then
/// ChaCha20-Poly1305 for CPUs without AES instructions).
fn provider() -> Arc<CryptoProvider> {
    let mut p = ring::default_provider();
    p.cipher_suites = vec![
        ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn cfg_err(e: impl fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// The source's side: presents its certificate, verifies the destination.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    /// The name the destination's certificate must carry, when not the
    /// host part of the address dialled.
    server_name: Option<String>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads `files`; `server_name` overrides the name checked in the
    /// destination's certificate.
    pub fn load(files: &TlsFiles, server_name: Option<String>) -> Result<Self, TlsError> {
        if let Some(n) = &server_name {
            ServerName::try_from(n.as_str()).map_err(|_| TlsError::Name(n.clone()))?;
        }
        let roots = load_roots(&files.ca)?;
        let certs = load_certs("certificate", &files.cert)?;
        let key = load_key(&files.key)?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(cfg_err)?;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The name checked for a destination at `addr` (`host:port`).
    pub fn name_for(&self, addr: &str) -> String {
        self.server_name
            .clone()
            .unwrap_or_else(|| host_of(addr).to_string())
    }

    /// Runs the handshake on `sock` as the client, until `deadline`,
    /// checking the destination's certificate against `name`.
    pub fn connect(
        &self,
        sock: TcpStream,
        name: &str,
        deadline: Instant,
    ) -> Result<Conn, HandshakeError> {
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| HandshakeError::Name(name.to_string()))?;
        let conn =
            ClientConnection::new(self.config.clone(), server_name).map_err(HandshakeError::Tls)?;
        finish(sock, conn.into(), deadline)
    }
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The destination's side: presents its certificate, requires one from
/// the source, signed by the CA and carrying an allowed name.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    allow: Arc<Vec<String>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads `files`. A source's certificate must name one of `allow`
    /// (DNS or IP subject alternative names); an empty list allows any
    /// certificate the CA signed.
    pub fn load(files: &TlsFiles, allow: Vec<String>) -> Result<Self, TlsError> {
        for n in &allow {
            ServerName::try_from(n.as_str()).map_err(|_| TlsError::Name(n.clone()))?;
        }
        let roots = load_roots(&files.ca)?;
        let certs = load_certs("certificate", &files.cert)?;
        let key = load_key(&files.key)?;
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(cfg_err)?;
        let allow = Arc::new(allow);
        let verifier = Arc::new(AllowList {
            inner,
            allow: allow.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(cfg_err)?;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Self {
            config: Arc::new(config),
            allow,
        })
    }

    /// The names a source's certificate may carry (empty: any).
    pub fn allowed(&self) -> &[String] {
        &self.allow
    }

    /// Runs the handshake on `sock` as the server, until `deadline`.
    pub fn accept(&self, sock: TcpStream, deadline: Instant) -> Result<Conn, HandshakeError> {
        let conn = ServerConnection::new(self.config.clone()).map_err(HandshakeError::Tls)?;
        finish(sock, conn.into(), deadline)
    }
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// The socket failed or closed, or the deadline passed.
    Io(std::io::Error),
    /// The TLS exchange failed (a certificate, a name, not TLS at all).
    Tls(rustls::Error),
    /// The name to check is not a DNS name or IP address.
    Name(String),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use rustls::Error as E;
        match self {
            HandshakeError::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                write!(f, "TLS handshake timed out")
            }
            HandshakeError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                write!(f, "the peer closed the connection during the TLS handshake")
            }
            HandshakeError::Io(e) => write!(f, "TLS handshake: {e}"),
            HandshakeError::Name(n) => write!(f, "{n:?} is not a DNS name or IP address"),
            HandshakeError::Tls(e) => match e {
                E::InvalidMessage(_) | E::InappropriateHandshakeMessage { .. } => {
                    write!(f, "not TLS (or a broken TLS peer): {e}")
                }
                E::InappropriateMessage { .. } => write!(f, "not TLS: {e}"),
                E::NoCertificatesPresented => write!(f, "the peer presented no certificate"),
                E::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                ) => {
                    write!(f, "certificate from an unknown CA (not signed by --tls-ca)")
                }
                E::InvalidCertificate(CertificateError::NotValidForName)
                | E::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
                    write!(f, "certificate not valid for the expected name: {e}")
                }
                E::InvalidCertificate(CertificateError::Other(o)) => {
                    write!(f, "certificate refused: {o}")
                }
                E::AlertReceived(a) => write!(f, "the peer refused the TLS handshake: {a:?}"),
                _ => write!(f, "TLS handshake failed: {e}"),
            },
        }
    }
}

impl std::error::Error for HandshakeError {}

/// Drives a handshake to its end over the non-blocking `sock`.
fn finish(sock: TcpStream, mut tls: Connection, deadline: Instant) -> Result<Conn, HandshakeError> {
    sock.set_nonblocking(true).map_err(HandshakeError::Io)?;
    let write_out = |tls: &mut Connection| -> Result<(), HandshakeError> {
        while tls.wants_write() {
            match tls.write_tls(&mut &sock) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait(&sock, PollFlags::POLLOUT, Some(deadline)).map_err(HandshakeError::Io)?
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
        Ok(())
    };
    while tls.is_handshaking() {
        write_out(&mut tls)?;
        if !tls.is_handshaking() {
            break;
        }
        match tls.read_tls(&mut &sock) {
            Ok(0) => return Err(HandshakeError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {
                if let Err(e) = tls.process_new_packets() {
                    // Send the alert that says why, best effort.
                    let _ = write_out(&mut tls);
                    return Err(HandshakeError::Tls(e));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait(&sock, PollFlags::POLLIN, Some(deadline)).map_err(HandshakeError::Io)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HandshakeError::Io(e)),
        }
    }
    write_out(&mut tls)?;
    let stream = TlsStream::new(sock, tls).map_err(HandshakeError::Io)?;
    Ok(Conn::Tls(Arc::new(stream)))
}

/// The CA's verdict, then the allow-list of names.
#[derive(Debug)]
struct AllowList {
    inner: Arc<dyn ClientCertVerifier>,
    allow: Arc<Vec<String>>,
}

/// A certificate the CA signed but whose names are not allowed.
#[derive(Debug)]
struct NotAllowed(Vec<String>);

impl fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the certificate names none of the allowed peers ({})",
            self.0.join(", ")
        )
    }
}

impl std::error::Error for NotAllowed {}

impl ClientCertVerifier for AllowList {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allow.is_empty() {
            return Ok(verified);
        }
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let named = self.allow.iter().any(|n| {
            ServerName::try_from(n.as_str())
                .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
        });
        if named {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(NotAllowed(self.allow.to_vec()))),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_strips_the_port_and_brackets() {
        assert_eq!(host_of("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(host_of("dest:7000"), "dest");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("dest"), "dest");
    }
}
