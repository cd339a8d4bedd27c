//! TLS for Portcullis's own outbound HTTPS (identity providers, the ops CLI talking to a
//! gateway): our aws-lc-rs rustls, the system's roots plus an optional CA file, so no
//! second crypto provider is linked and every client trusts the same way.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A rustls client configuration trusting the system roots and the PEM CAs in `extra_ca`.
pub fn tls_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    client_tls_config(extra_ca, None)
}

/// The certificates of a PEM file: CAs to trust, or a client's chain. Lets configuration
/// be checked before start without loading the system roots, which
/// [`client_tls_config`] does once when the client is built.
pub fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A client certificate chain and its key, from PEM files.
pub type ClientIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Reads a client certificate chain and its private key (PEM) for mutual TLS.
pub fn client_identity(cert: &Path, key: &Path) -> Result<ClientIdentity, String> {
    let chain = pem_certs(cert)?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    Ok((chain, key))
}

/// [`tls_config`], presenting the certificate and key of `identity` (PEM files) when the
/// server asks for one.
pub fn client_tls_config(
    extra_ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(ca) = extra_ca {
        for cert in pem_certs(ca)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let (chain, key) = client_identity(cert, key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{}: {e}", cert.display()))
        }
    }
}
