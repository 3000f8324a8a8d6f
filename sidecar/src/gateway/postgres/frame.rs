//! Framing: the untyped startup packet, and `tag + length + body` messages after it.
//!
//! Lengths are checked before anything is allocated: a peer cannot make the gateway buffer
//! more than [`MAX_MESSAGE`] bytes for one message, and a malformed length is an error, never
//! a panic or a hang.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest message accepted from either side (PostgreSQL's own limit for a query is 1 GiB;
/// agents have no business sending more than this through the gateway).
pub const MAX_MESSAGE: usize = 64 << 20;
/// The largest startup packet accepted (PostgreSQL uses 10 000 bytes).
pub const MAX_STARTUP: usize = 10_000;

/// The protocol version 3.0.
pub const PROTOCOL_3_0: u32 = 196_608;
/// The code of an SSLRequest.
pub const SSL_REQUEST: u32 = 80_877_103;
/// The code of a GSSENCRequest.
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// The code of a CancelRequest.
pub const CANCEL_REQUEST: u32 = 80_877_102;

/// A protocol error: what the peer sent that cannot be accepted.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A length is impossible or above the limit.
    #[error("invalid message length {0}")]
    Length(i64),
    /// A message is shorter than its contents need, or has bytes left over.
    #[error("malformed {what} message: {why}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// A text field is not valid UTF-8.
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    /// The startup packet asks for a protocol version other than 3.x.
    #[error("unsupported protocol version {0}.{1}")]
    Version(u16, u16),
}

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// The client asks for TLS.
    SslRequest,
    /// The client asks for GSSAPI encryption.
    GssEncRequest,
    /// Cancel the query of another connection.
    Cancel {
        /// Its process id.
        pid: i32,
        /// Its secret key.
        key: Vec<u8>,
    },
    /// A startup message: protocol version and parameters (`user`, `database`, …).
    Startup {
        /// Minor protocol version (major is 3).
        minor: u16,
        /// Parameters in order.
        params: Vec<(String, String)>,
    },
}

impl Startup {
    /// A parameter of a startup message.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Self::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Reads a NUL-terminated UTF-8 string.
pub fn cstring(buf: &mut Bytes, what: &'static str) -> Result<String, FrameError> {
    let end = buf
        .iter()
        .position(|b| *b == 0)
        .ok_or(FrameError::Malformed {
            what,
            why: "a string is not NUL-terminated",
        })?;
    let s = buf.split_to(end);
    buf.advance(1);
    String::from_utf8(s.to_vec()).map_err(|_| FrameError::Utf8(what))
}

/// Writes a NUL-terminated string.
pub fn put_cstring(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// Reads a big-endian i16, checking there is one.
pub fn get_i16(buf: &mut Bytes, what: &'static str) -> Result<i16, FrameError> {
    if buf.remaining() < 2 {
        return Err(FrameError::Malformed {
            what,
            why: "truncated",
        });
    }
    Ok(buf.get_i16())
}

/// Reads a big-endian i32, checking there is one.
pub fn get_i32(buf: &mut Bytes, what: &'static str) -> Result<i32, FrameError> {
    if buf.remaining() < 4 {
        return Err(FrameError::Malformed {
            what,
            why: "truncated",
        });
    }
    Ok(buf.get_i32())
}

/// Reads `n` bytes, checking they are there.
pub fn get_bytes(buf: &mut Bytes, n: usize, what: &'static str) -> Result<Bytes, FrameError> {
    if buf.remaining() < n {
        return Err(FrameError::Malformed {
            what,
            why: "truncated",
        });
    }
    Ok(buf.split_to(n))
}

/// Reads the startup packet.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<Startup, FrameError> {
    let len = r.read_i32().await?;
    if len < 8 || len as usize > MAX_STARTUP {
        return Err(FrameError::Length(i64::from(len)));
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await?;
    let mut b = Bytes::from(body);
    let code = b.get_u32();
    match code {
        SSL_REQUEST if b.is_empty() => Ok(Startup::SslRequest),
        GSSENC_REQUEST if b.is_empty() => Ok(Startup::GssEncRequest),
        CANCEL_REQUEST => {
            let pid = get_i32(&mut b, "CancelRequest")?;
            // Protocol 3.2 allows longer keys; 3.0 uses four bytes.
            if b.is_empty() || b.len() > 256 {
                return Err(FrameError::Malformed {
                    what: "CancelRequest",
                    why: "bad key length",
                });
            }
            Ok(Startup::Cancel {
                pid,
                key: b.to_vec(),
            })
        }
        SSL_REQUEST | GSSENC_REQUEST => Err(FrameError::Malformed {
            what: "SSLRequest",
            why: "unexpected body",
        }),
        v if v >> 16 == 3 => {
            let mut params = Vec::new();
            loop {
                if b.first() == Some(&0) {
                    b.advance(1);
                    break;
                }
                let k = cstring(&mut b, "StartupMessage")?;
                let v = cstring(&mut b, "StartupMessage")?;
                params.push((k, v));
            }
            if !b.is_empty() {
                return Err(FrameError::Malformed {
                    what: "StartupMessage",
                    why: "bytes after the parameters",
                });
            }
            Ok(Startup::Startup {
                minor: (v & 0xffff) as u16,
                params,
            })
        }
        v => Err(FrameError::Version((v >> 16) as u16, (v & 0xffff) as u16)),
    }
}

/// Encodes a startup message.
pub fn startup_message(minor: u16, params: &[(String, String)]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u32(PROTOCOL_3_0 | u32::from(minor));
    for (k, v) in params {
        put_cstring(&mut body, k);
        put_cstring(&mut body, v);
    }
    body.put_u8(0);
    let mut out = BytesMut::with_capacity(body.len() + 4);
    out.put_i32((body.len() + 4) as i32);
    out.put_slice(&body);
    out.freeze()
}

/// One typed message: its tag and body (without the length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message type byte.
    pub tag: u8,
    /// The body.
    pub body: Bytes,
}

impl Frame {
    /// A frame from a tag and body.
    pub fn new(tag: u8, body: impl Into<Bytes>) -> Self {
        Self {
            tag,
            body: body.into(),
        }
    }

    /// The encoded message.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.body.len() + 5);
        out.put_u8(self.tag);
        out.put_i32((self.body.len() + 4) as i32);
        out.put_slice(&self.body);
    }
}

/// Reads one message, or `None` at a clean end of stream (between messages).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Frame>, FrameError> {
    let tag = match r.read_u8().await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let len = r.read_i32().await?;
    if len < 4 || len as usize - 4 > max {
        return Err(FrameError::Length(i64::from(len)));
    }
    // Memory grows with the bytes that arrive, not with what the length claims: a peer that
    // announces a large message and sends nothing costs nothing.
    let n = len as usize - 4;
    let mut body = Vec::with_capacity(n.min(64 << 10));
    (&mut *r).take(n as u64).read_to_end(&mut body).await?;
    if body.len() != n {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some(Frame {
        tag,
        body: Bytes::from(body),
    }))
}

/// Writes messages without flushing (the caller flushes when no more input is waiting).
pub async fn write_frames_unflushed<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Frame],
) -> Result<(), FrameError> {
    for f in frames {
        let mut out = BytesMut::with_capacity(f.body.len() + 5);
        f.encode(&mut out);
        w.write_all(&out).await?;
    }
    Ok(())
}

/// Writes messages and flushes.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Frame],
) -> Result<(), FrameError> {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn startup_packets() {
        let msg = startup_message(
            0,
            &[
                ("user".into(), "claude".into()),
                ("database".into(), "app".into()),
            ],
        );
        let s = read_startup(&mut &msg[..]).await.unwrap();
        assert_eq!(s.param("user"), Some("claude"));
        assert_eq!(s.param("database"), Some("app"));
        let ssl = [0, 0, 0, 8, 4, 210, 22, 47];
        assert_eq!(
            read_startup(&mut &ssl[..]).await.unwrap(),
            Startup::SslRequest
        );
        let cancel = [0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 7, 1, 2, 3, 4];
        assert_eq!(
            read_startup(&mut &cancel[..]).await.unwrap(),
            Startup::Cancel {
                pid: 7,
                key: vec![1, 2, 3, 4]
            }
        );
    }

    #[tokio::test]
    async fn bad_startup_packets_are_errors() {
        for bad in [
            &[0u8, 0, 0, 4][..],                              // too short
            &[0x7f, 0xff, 0xff, 0xff][..],                    // too long
            &[0, 0, 0, 8, 0, 2, 0, 0][..],                    // protocol 2.0
            &[0, 0, 0, 12, 0, 3, 0, 0, b'u', 0, b'x', 0][..], // no terminator
            &[0, 0, 0, 11, 0, 3, 0, 0, 0xff, 0, 0][..],       // invalid UTF-8
            &[0, 0, 0, 20][..],                               // truncated stream
        ] {
            assert!(read_startup(&mut &bad[..]).await.is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let mut out = BytesMut::new();
        Frame::new(b'Q', &b"SELECT 1\0"[..]).encode(&mut out);
        let f = read_frame(&mut &out[..], MAX_MESSAGE)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((f.tag, &f.body[..]), (b'Q', &b"SELECT 1\0"[..]));
        assert!(
            read_frame(&mut &[][..], MAX_MESSAGE)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            read_frame(&mut &[b'Q', 0, 0, 0, 3][..], MAX_MESSAGE)
                .await
                .is_err()
        );
        assert!(
            read_frame(&mut &[b'Q', 0x7f, 0, 0, 0][..], MAX_MESSAGE)
                .await
                .is_err()
        );
        assert!(
            read_frame(&mut &[b'Q', 0, 0, 0, 9, b'S'][..], MAX_MESSAGE)
                .await
                .is_err()
        );
    }
}
