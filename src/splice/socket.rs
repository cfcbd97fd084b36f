//! The socket operations the splice uses, for either kind of stream a leg
//! can be: TCP (the client leg, and a `host:port` upstream) or a Unix
//! domain socket (a `unix:` upstream, docs/operations.md#unix-socket-upstream).
//!
//! Why a trait of our own: the splice reads and writes with readiness and
//! `try_*` calls, not through `AsyncRead`/`AsyncWrite` (see the module docs
//! of `splice`), and tokio gives `TcpStream` and `UnixStream` the same such
//! methods without a trait that names them. The splice is generic over this
//! one, so each kind of leg gets its own copy of the loop, with the calls
//! resolved at compile time: nothing on the per-message path changes for
//! TCP.

use std::io;
use std::net::Shutdown;
use std::task::{Context, Poll};

use bytes::BufMut;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// A connected stream socket as the splice drives it. Each method is the
/// tokio method of the same name (`shutdown_write` is `shutdown(Write)`).
pub(crate) trait Socket {
    /// Waits until the socket may be readable.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Waits until the socket may be writable.
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads into `buf`'s spare capacity without waiting.
    fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize>;
    /// Writes what the socket takes of `buf` without waiting.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    /// Runs `f` for `interest`, clearing that readiness if it returns
    /// `WouldBlock`.
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Sends a FIN: the peer reads EOF, and can still send.
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Socket for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }
    fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        TcpStream::try_io(self, interest, f)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        // Through the descriptor: tokio's own shutdown needs `&mut self`
        // (it is `AsyncWrite::poll_shutdown`), and both legs are borrowed.
        SockRef::from(self).shutdown(Shutdown::Write)
    }
}

impl Socket for UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_read_ready(self, cx)
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_write_ready(self, cx)
    }
    fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize> {
        UnixStream::try_read_buf(self, buf)
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        UnixStream::try_write(self, buf)
    }
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        UnixStream::try_io(self, interest, f)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        SockRef::from(self).shutdown(Shutdown::Write)
    }
}
