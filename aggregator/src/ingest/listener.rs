//! The agents' ingest listener: TLS with required client certificates (docs/design.md §5).
//!
//! The handshake runs in the connection's own task (a slow or hostile client cannot stall the
//! accept loop) under [`HANDSHAKE_TIMEOUT`], and only connections whose certificate chains to
//! `TLS_CLIENT_CA` reach the HTTP server. The certificate's common name travels with the
//! connection and names the agent. Accepting, limits and timeouts are [`crate::listeners`]'.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::certs::common_name;

/// Handshakes not finished within this are dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of an ingest connection.
#[derive(Clone, Debug)]
pub struct AgentPeer {
    pub addr: SocketAddr,
    /// The client certificate's common name.
    pub name: Option<String>,
}

/// TLS: with the ingest listener's configuration (client certificates required), a connection is
/// served only once its client certificate is verified.
pub struct TlsHandshake {
    acceptor: TlsAcceptor,
}

impl TlsHandshake {
    pub fn new(config: Arc<rustls::ServerConfig>) -> TlsHandshake {
        TlsHandshake {
            acceptor: TlsAcceptor::from(config),
        }
    }
}

impl crate::listeners::Handshake for TlsHandshake {
    type Io = TlsStream<TcpStream>;
    type Peer = AgentPeer;
    const PLAIN: bool = false;

    async fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> Option<(TlsStream<TcpStream>, AgentPeer)> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                let name = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|cert| common_name(cert));
                Some((tls, AgentPeer { addr, name }))
            }
            Ok(Err(error)) => {
                metrics::counter!("logging_aggregator_ingest_tls_refused_total").increment(1);
                tracing::info!(peer = %addr, %error, "ingest TLS handshake refused");
                None
            }
            Err(_) => {
                metrics::counter!("logging_aggregator_ingest_tls_refused_total").increment(1);
                tracing::info!(peer = %addr, "ingest TLS handshake timed out");
                None
            }
        }
    }
}
