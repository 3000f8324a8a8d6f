//! Where agents connect: the loopback TCP port and, optionally, a Unix socket in a directory
//! shared with the agent's containers (`PGHOST=<dir>`, as libpq names it:
//! `<dir>/.s.PGSQL.<port>`). Each relay thread accepts and relays its own connections.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;

use super::session::{Gateway, handle};

/// An agent's connection: TCP on loopback or the Unix socket.
#[derive(Debug)]
pub enum AgentStream {
    /// Through the loopback port.
    Tcp(TcpStream),
    /// Through the Unix socket.
    Unix(UnixStream),
}

impl AgentStream {
    /// A duplicate of the socket's descriptor, to see whether the agent has closed its end
    /// while nothing reads from it (a held statement: see [`peer_closed`]).
    pub fn watcher(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        match self {
            Self::Tcp(s) => s.as_fd().try_clone_to_owned().ok(),
            Self::Unix(s) => s.as_fd().try_clone_to_owned().ok(),
        }
    }
}

/// Whether the peer of socket `fd` has closed its end (or the socket failed), without reading
/// from it: `POLLRDHUP` is reported even while unread data waits before the end.
pub fn peer_closed(fd: &std::os::fd::OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut fds = [PollFd::new(fd, PollFlags::RDHUP)];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&zero)) {
        Ok(n) if n > 0 => fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR),
        _ => false,
    }
}

impl AsyncRead for AgentStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Serves one accepted connection on a task of the runtime that accepted it: each accept loop
/// runs on the event loop its connections are relayed on, so a new connection is never
/// handed from one thread to another.
fn relay(gw: &Arc<Gateway>, conn: AgentStream) {
    let gw = gw.clone();
    tokio::spawn(async move {
        if let Err(e) = handle(conn, gw).await {
            tracing::debug!(error = %e, "connection ended");
        }
    });
}

/// Accepts connections on the loopback port until `stop` turns true (the sidecar is
/// stopping) and relays each on the caller's runtime. Several loops (one per relay thread)
/// may accept from clones of one listener.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((sock, _)) => {
                // Each answer is one write: never held back waiting for an ACK.
                let _ = sock.set_nodelay(true);
                relay(&gw, AgentStream::Tcp(sock));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // Out of file descriptors: wait instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepts connections on the Unix socket until `stop` turns true, as [`serve`].
pub async fn serve_unix(listener: UnixListener, gw: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((sock, _)) => relay(&gw, AgentStream::Unix(sock)),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on the Unix socket");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// The socket's path in `dir` for `port`, as libpq derives it from `PGHOST` and `PGPORT`.
pub fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// Binds the Unix socket in `dir` (created when missing), replacing a socket a previous run
/// left behind (never another kind of file). The socket is open to every user that can reach
/// the directory (the agent's containers may run as another user): the directory's mount is
/// what confines it.
pub fn bind_unix(dir: &Path, port: u16) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    std::fs::create_dir_all(dir)?;
    let path = socket_path(dir, port);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    open_to_all(&path)?;
    Ok(listener)
}

/// Makes the socket at `path` connectable by every user, without following a symlink: what
/// is at `path` is opened as a path (`O_PATH | O_NOFOLLOW`), checked to be a socket, and
/// changed through that descriptor, so a socket swapped for a link to another file between
/// the bind and the change leaves that file alone.
fn open_to_all(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
    let at = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    if !at.metadata()?.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} was replaced by another kind of file", path.display()),
        ));
    }
    std::fs::set_permissions(
        format!("/proc/self/fd/{}", at.as_raw_fd()),
        std::fs::Permissions::from_mode(0o666),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_any_other_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let first = bind_unix(dir.path(), 5432).unwrap();
        drop(first);
        // Left behind by a run that was killed: bound again.
        let again = bind_unix(dir.path(), 5432).unwrap();
        drop(again);
        let path = socket_path(dir.path(), 5432);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not a socket").unwrap();
        let e = bind_unix(dir.path(), 5432).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }

    #[test]
    fn a_socket_swapped_for_a_link_does_not_open_the_file_it_points_to() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("signing-key");
        std::fs::write(&key, b"secret").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = socket_path(dir.path(), 5432);
        std::os::unix::fs::symlink(&key, &path).unwrap();
        let e = open_to_all(&path).unwrap_err();
        assert!(e.to_string().contains("another kind of file"), "{e}");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
