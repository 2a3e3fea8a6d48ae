//! The agents' ingest listener: TLS with required client certificates (DESIGN §5).
//!
//! Handshakes run in their own tasks (a slow or hostile client cannot stall the accept loop)
//! and only connections whose certificate chains to `TLS_CLIENT_CA` reach the HTTP server.
//! The certificate's common name travels with the connection and names the agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
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

/// Accepted, authenticated TLS connections, for `axum::serve`.
pub struct TlsListener {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, AgentPeer)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener` until `stop` turns true.
    pub fn spawn(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (sender, connections) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let (tcp, addr) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        tracing::warn!(%error, "ingest accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, sender) = (acceptor.clone(), sender.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let name = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| certs.first())
                                .and_then(|cert| common_name(cert));
                            let _ = sender.send((tls, AgentPeer { addr, name })).await;
                        }
                        Ok(Err(error)) => {
                            metrics::counter!("logging_aggregator_ingest_tls_refused_total")
                                .increment(1);
                            tracing::info!(peer = %addr, %error, "ingest TLS handshake refused");
                        }
                        Err(_) => {
                            metrics::counter!("logging_aggregator_ingest_tls_refused_total")
                                .increment(1);
                            tracing::info!(peer = %addr, "ingest TLS handshake timed out");
                        }
                    }
                });
            }
        });
        Ok(TlsListener { connections, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = AgentPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept loop has stopped: no more connections, ever.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(AgentPeer {
            addr: self.local,
            name: None,
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for AgentPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
