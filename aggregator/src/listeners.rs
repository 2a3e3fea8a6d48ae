//! The accept loops of the three listeners (operator API, agents' mTLS ingest, metrics), with
//! the limits that keep one hostile client from locking everyone out:
//!
//! - **a connection limit per listener** (`MAX_CONNECTIONS`): past it a new connection is
//!   answered `503` (plain listeners) or closed (TLS) at once, so idle or slow clients on the
//!   API can never take the descriptors the agents' ingest needs, and the reverse;
//! - **a header timeout** (`HTTP_HEADER_TIMEOUT`): a client has that long to send a request's
//!   headers, and an idle keep-alive connection is closed after it (slowloris, idle sockets);
//! - **a stall timeout** (`HTTP_BODY_TIMEOUT`): a connection whose writes make no progress for
//!   that long (a client that does not read its answer) is closed; the body itself is bounded
//!   by the same time in [`crate::api::Body`];
//! - **a TLS handshake timeout** on the ingest listener, run in the connection's own task.
//!
//! Accept errors (the process out of descriptors) are logged and retried after a pause, never
//! fatal. On stop, listeners stop accepting, idle connections close and requests in flight
//! finish (up to [`DRAIN`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tower_service::Service;

/// The longest a stop waits for connections to finish their requests.
pub const DRAIN: Duration = Duration::from_secs(30);
/// What a plain listener answers a connection past its limit.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 52\r\n\r\ntoo many connections to this listener; retry shortly";

/// The limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub stall_timeout: Duration,
    /// Serve HTTP/2 (cleartext, prior knowledge: gRPC) instead of HTTP/1.1.
    pub http2: bool,
}

impl Limits {
    pub fn of(config: &crate::config::Config) -> Limits {
        Limits {
            max_connections: config.max_connections,
            header_timeout: Duration::from_secs(config.http_header_timeout),
            stall_timeout: Duration::from_secs(config.http_body_timeout),
            http2: false,
        }
    }
}

/// Turns an accepted TCP connection into the stream HTTP is served on, and says who is on the
/// other end (`None`: refused, e.g. a failed TLS handshake).
pub trait Handshake: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Peer: Clone + Send + Sync + 'static;
    /// Whether a refused connection gets a plain-text `503` (not on a TLS port).
    const PLAIN: bool;

    fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> impl Future<Output = Option<(Self::Io, Self::Peer)>> + Send;
}

/// Plain HTTP: the peer is its socket address.
pub struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;
    type Peer = SocketAddr;
    const PLAIN: bool = true;

    async fn handshake(&self, tcp: TcpStream, addr: SocketAddr) -> Option<(TcpStream, SocketAddr)> {
        Some((tcp, addr))
    }
}

/// Serves `router` on `listener` until `stop` turns true; `name` labels the metrics.
pub fn serve<H: Handshake>(
    name: &'static str,
    listener: TcpListener,
    handshake: H,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let handshake = Arc::new(handshake);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stopped(&mut stop) => break,
            };
            let (tcp, addr) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of descriptors, usually: the connections we hold will close (they
                    // all have timeouts), so wait a little rather than spin or give up.
                    tracing::warn!(listener = name, %error, "accept failed; retrying shortly");
                    metrics::counter!("logging_aggregator_accept_errors_total", "listener" => name)
                        .increment(1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics::counter!("logging_aggregator_connections_refused_total", "listener" => name)
                    .increment(1);
                tokio::spawn(refuse(tcp, H::PLAIN));
                continue;
            };
            let (handshake, router, stop) = (handshake.clone(), router.clone(), stop.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let Some((io, peer)) = handshake.handshake(tcp, addr).await else {
                    return;
                };
                connection(io, peer, router, limits, stop).await;
            });
        }
        // Stopped: wait until every connection has finished (or DRAIN has passed).
        let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(DRAIN, slots.acquire_many(all)).await;
    })
}

/// Resolves once `stop` turns true (holding no borrow of it across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Answers a connection past the limit, best effort and briefly, then closes it.
async fn refuse(mut tcp: TcpStream, plain: bool) {
    if plain {
        let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(BUSY)).await;
    }
}

/// Serves HTTP/1.1 on one connection until the client closes it, a timeout closes it, or the
/// listener stops (then the request in flight finishes first).
async fn connection<Io, P>(
    io: Io,
    peer: P,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Clone + Send + Sync + 'static,
{
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer.clone()));
            let mut router = router.clone();
            async move { router.call(request.map(axum::body::Body::new)).await }
        });
    if limits.http2 {
        return connection_h2(io, service, limits, stop).await;
    }
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let io = TokioIo::new(Stalled::new(io, limits.stall_timeout));
    // With upgrades: a WebSocket (Loki's tail) takes the connection over; the upgraded
    // stream keeps the stall timeout on writes.
    let connection = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// HTTP/2 on one connection (gRPC): pings find a dead peer within the header timeout, and
/// stalled writes close it as on HTTP/1.1.
async fn connection_h2<Io, S>(io: Io, service: S, limits: Limits, mut stop: watch::Receiver<bool>)
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = axum::body::Body>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_timeout))
        .keep_alive_timeout(limits.header_timeout)
        .max_concurrent_streams(64);
    let io = TokioIo::new(Stalled::new(io, limits.stall_timeout));
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// A stream whose writes fail once they have made no progress for `limit`: a client that
/// stops reading its answers cannot hold a connection (and its buffers) forever.
pub struct Stalled<Io> {
    io: Io,
    limit: Duration,
    /// Armed while a write is waiting on the client.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<Io> Stalled<Io> {
    pub fn new(io: Io, limit: Duration) -> Stalled<Io> {
        Stalled {
            io,
            limit,
            deadline: None,
        }
    }

    /// After a write returned `Pending`: fails once the stall has lasted `limit`.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let limit = self.limit;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client has not read its answer for HTTP_BODY_TIMEOUT",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Stalled<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Stalled<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Pending => self.check(cx),
            ready => {
                self.deadline = None;
                ready
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.check(cx),
            ready => {
                self.deadline = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Pending => match self.check(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
            ready => {
                self.deadline = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Raises this process's open-files limit to its hard limit (as Go's runtime does): the
/// default soft limit of 1,024 is below what three listeners may legitimately hold.
pub fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!(soft = limit.rlim_cur, "cannot raise the open-files limit");
            }
        }
    }
}

/// The process's open-files limit (soft).
pub fn open_files_limit() -> Option<u64> {
    // SAFETY: getrlimit only writes the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        (libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0).then_some(limit.rlim_cur)
    }
}
