//! Accepting connections with a cap on how many are open at once, so a flood of
//! connections (a misbehaving site, a scanner inside the VPN) cannot exhaust the
//! coordinator's file descriptors and memory. Each accepted TCP stream holds a
//! permit until it closes; a connection beyond the cap is closed at once.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A TCP connection that counts against the cap while it is open.
pub struct LimitedStream {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for LimitedStream {
    // The TCP info, unchanged: tonic's TLS layer wraps it, so peer certificates stay visible.
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepted connections, at most `max` open at once; the rest are closed on arrival.
pub fn limited(
    listener: TcpListener,
    max: usize,
) -> impl Stream<Item = std::io::Result<LimitedStream>> {
    let permits = Arc::new(Semaphore::new(max));
    TcpListenerStream::new(listener).filter_map(move |accepted| match accepted {
        Err(e) => {
            // Accept errors (e.g. EMFILE) are transient: log and keep accepting.
            tracing::warn!("accepting a connection failed: {e}");
            None
        }
        Ok(stream) => match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let _ = stream.set_nodelay(true);
                Some(Ok(LimitedStream {
                    inner: stream,
                    _permit: permit,
                }))
            }
            Err(_) => {
                tracing::warn!(
                    peer = ?stream.peer_addr().ok(),
                    max,
                    "connection refused: limits.max_connections reached"
                );
                None
            }
        },
    })
}
