//! TLS for the streaming server (`[cri] stream_tls_cert` and `stream_tls_key`): rustls with
//! the aws-lc-rs provider (already in the tree through the registry client), TLS 1.2 and 1.3,
//! no client certificates (the one-time tokens authorise a request, as with containerd).

use std::io;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::StreamTls;

/// The acceptor for `files`; an error names the file and what is wrong with it.
pub(super) fn acceptor(files: &StreamTls) -> io::Result<TlsAcceptor> {
    let bad = |path: &std::path::Path, why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {why}", path.display()),
        )
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(&files.cert, format!("cri.stream_tls_cert: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            &files.cert,
            "cri.stream_tls_cert: no PEM certificate in it".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| bad(&files.key, format!("cri.stream_tls_key: {e}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            bad(
                &files.key,
                format!("cri.stream_tls_cert and cri.stream_tls_key do not make a pair: {e}"),
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
