//! HTTPS through rustls. The certificate chain is `ssl.cert_file` followed by
//! `ssl.ca_bundle_file`; the key is `ssl.private_file` (PKCS#8, PKCS#1 or SEC1 PEM).
//!
//! Every problem with those files is an error naming the key, the file and the fix, and it stops
//! the start: a host configured for HTTPS never falls back to plain HTTP. The certificate sits
//! behind [`Certs`], so a renewed certificate is taken up by [`Certs::reload`] (the binary calls
//! it on SIGHUP) without dropping connections.

use ams_core::webconf::SslConf;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The process's rustls provider (the binary installs ring), or ring.
fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The files named in web_conf.json, resolved against the data directory.
#[derive(Debug, Clone)]
pub struct CertFiles {
    cert: PathBuf,
    bundle: Option<PathBuf>,
    key: PathBuf,
    /// web_conf.json, named in errors.
    conf_file: PathBuf,
}

impl CertFiles {
    /// `base` resolves relative paths (the data directory).
    pub fn from_conf(ssl: &SslConf, base: &Path, conf_file: &Path) -> Result<Self, String> {
        let need = |v: &Option<String>, key: &str| -> Result<PathBuf, String> {
            match v.as_deref().map(str::trim) {
                Some(p) if !p.is_empty() => Ok(base.join(p)),
                _ => Err(format!(
                    "{}: use_ssl is true but ssl.{key} is not set; set it to the path of the \
                     PEM file, or set use_ssl to false",
                    conf_file.display()
                )),
            }
        };
        Ok(CertFiles {
            cert: need(&ssl.cert_file, "cert_file")?,
            bundle: match ssl.ca_bundle_file.as_deref().map(str::trim) {
                Some(p) if !p.is_empty() => Some(base.join(p)),
                _ => None,
            },
            key: need(&ssl.private_file, "private_file")?,
            conf_file: conf_file.to_path_buf(),
        })
    }

    fn read(&self, path: &Path, key: &str) -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|e| {
            format!(
                "{}: ssl.{key}: cannot read {}: {e}; fix the path or the file's permissions",
                self.conf_file.display(),
                path.display()
            )
        })
    }

    fn certs(&self, path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
        let pem = self.read(path, key)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                format!(
                    "{}: ssl.{key}: {} is not valid PEM ({e:?})",
                    self.conf_file.display(),
                    path.display()
                )
            })?;
        if certs.is_empty() {
            return Err(format!(
                "{}: ssl.{key}: {} holds no certificate; it must hold PEM \
                 `-----BEGIN CERTIFICATE-----` blocks",
                self.conf_file.display(),
                path.display()
            ));
        }
        Ok(certs)
    }

    /// Reads and checks the files: the chain parses, the key parses and matches the certificate.
    pub fn load(&self) -> Result<CertifiedKey, String> {
        let mut chain = self.certs(&self.cert, "cert_file")?;
        if let Some(b) = &self.bundle {
            chain.extend(self.certs(b, "ca_bundle_file")?);
        }
        let pem = self.read(&self.key, "private_file")?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            format!(
                "{}: ssl.private_file: {} holds no usable private key ({e:?}); it must be a PEM \
                 PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key",
                self.conf_file.display(),
                self.key.display()
            )
        })?;
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
            format!(
                "{}: ssl.private_file: {} does not fit ssl.cert_file {} ({e}); use the key the \
                 certificate was issued for",
                self.conf_file.display(),
                self.key.display(),
                self.cert.display()
            )
        })
    }
}

/// The certificate in use; swapped whole by [`Certs::reload`].
#[derive(Debug)]
pub struct Certs {
    files: CertFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certs {
    pub fn load(files: CertFiles) -> Result<Arc<Self>, String> {
        let key = files.load()?;
        Ok(Arc::new(Certs {
            files,
            current: RwLock::new(Arc::new(key)),
        }))
    }

    /// Re-reads the files. On error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), String> {
        let key = Arc::new(self.files.load()?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = key;
        Ok(())
    }

    /// The rustls acceptor serving these certificates (HTTP/1.1 only).
    pub fn acceptor(self: &Arc<Self>) -> tokio_rustls::TlsAcceptor {
        let provider = provider();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}
