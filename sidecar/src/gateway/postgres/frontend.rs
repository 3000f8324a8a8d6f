//! Messages from the client (the agent) that the gateway must understand. Everything else is
//! refused: an unknown message type never reaches the database.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::frame::{Frame, FrameError, cstring, get_bytes, get_i16, get_i32, put_cstring};

/// A decoded frontend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend {
    /// `Q`: a simple query (one or more statements).
    Query(String),
    /// `P`: prepare a statement.
    Parse {
        /// Statement name (empty: the unnamed statement).
        name: String,
        /// The SQL.
        sql: String,
        /// Parameter type OIDs.
        param_types: Vec<i32>,
    },
    /// `B`: bind a portal (passed on unchanged; its values are parameters, not SQL).
    Bind {
        /// Portal name.
        portal: String,
        /// Statement name.
        statement: String,
        /// Result format codes: none (all text), one (for all columns) or one per column.
        result_formats: Vec<i16>,
        /// The whole body, forwarded as is.
        raw: Bytes,
    },
    /// `D`: describe a statement (`S`) or portal (`P`).
    Describe {
        /// `S` or `P`.
        kind: u8,
        /// Its name.
        name: String,
    },
    /// `E`: execute a portal.
    Execute {
        /// Portal name.
        portal: String,
        /// Row limit (0: all).
        max_rows: i32,
    },
    /// `C`: close a statement (`S`) or portal (`P`).
    Close {
        /// `S` or `P`.
        kind: u8,
        /// Its name.
        name: String,
    },
    /// `S`: end of an extended-protocol batch.
    Sync,
    /// `H`: flush.
    Flush,
    /// `X`: the client is leaving.
    Terminate,
    /// `p`: a password, SASL or GSS response (raw: its meaning depends on the auth step).
    Password(Bytes),
    /// `d`: COPY data.
    CopyData(Bytes),
    /// `c`: COPY done.
    CopyDone,
    /// `f`: COPY failed, with the client's message.
    CopyFail(String),
    /// `F`: a function call by OID (the legacy fast-path): refused by the gateway.
    FunctionCall,
}

impl Frontend {
    /// What the message is, for messages to the agent (`a Query message`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Query(_) => "a Query message",
            Self::Parse { .. } => "a Parse message",
            Self::Bind { .. } => "a Bind message",
            Self::Describe { .. } => "a Describe message",
            Self::Execute { .. } => "an Execute message",
            Self::Close { .. } => "a Close message",
            Self::Sync => "a Sync message",
            Self::Flush => "a Flush message",
            Self::Terminate => "a Terminate message",
            Self::Password(_) => "a password message",
            Self::CopyData(_) => "a CopyData message",
            Self::CopyDone => "a CopyDone message",
            Self::CopyFail(_) => "a CopyFail message",
            Self::FunctionCall => "a FunctionCall message",
        }
    }
}

fn done(buf: &Bytes, what: &'static str) -> Result<(), FrameError> {
    if buf.is_empty() {
        Ok(())
    } else {
        Err(FrameError::Malformed {
            what,
            why: "bytes after the end of the message",
        })
    }
}

/// Decodes a frontend message; unknown types are errors.
pub fn decode(frame: &Frame) -> Result<Frontend, FrameError> {
    let mut b = frame.body.clone();
    let msg = match frame.tag {
        b'Q' => {
            let sql = cstring(&mut b, "Query")?;
            done(&b, "Query")?;
            Frontend::Query(sql)
        }
        b'P' => {
            let name = cstring(&mut b, "Parse")?;
            let sql = cstring(&mut b, "Parse")?;
            let n = get_i16(&mut b, "Parse")?;
            if n < 0 {
                return Err(FrameError::Malformed {
                    what: "Parse",
                    why: "negative parameter count",
                });
            }
            let mut param_types = Vec::with_capacity(n as usize);
            for _ in 0..n {
                param_types.push(get_i32(&mut b, "Parse")?);
            }
            done(&b, "Parse")?;
            Frontend::Parse {
                name,
                sql,
                param_types,
            }
        }
        b'B' => {
            let raw = frame.body.clone();
            let portal = cstring(&mut b, "Bind")?;
            let statement = cstring(&mut b, "Bind")?;
            // Validate the rest so a malformed Bind never reaches the server.
            let nfmt = get_i16(&mut b, "Bind")?;
            if nfmt < 0 {
                return Err(FrameError::Malformed {
                    what: "Bind",
                    why: "negative format count",
                });
            }
            get_bytes(&mut b, nfmt as usize * 2, "Bind")?;
            let nparams = get_i16(&mut b, "Bind")?;
            if nparams < 0 {
                return Err(FrameError::Malformed {
                    what: "Bind",
                    why: "negative parameter count",
                });
            }
            for _ in 0..nparams {
                let len = get_i32(&mut b, "Bind")?;
                if len > 0 {
                    get_bytes(&mut b, len as usize, "Bind")?;
                } else if len < -1 {
                    return Err(FrameError::Malformed {
                        what: "Bind",
                        why: "negative parameter length",
                    });
                }
            }
            let nres = get_i16(&mut b, "Bind")?;
            if nres < 0 {
                return Err(FrameError::Malformed {
                    what: "Bind",
                    why: "negative result format count",
                });
            }
            let mut result_formats = Vec::with_capacity(nres as usize);
            for _ in 0..nres {
                let f = get_i16(&mut b, "Bind")?;
                if !matches!(f, 0 | 1) {
                    return Err(FrameError::Malformed {
                        what: "Bind",
                        why: "result format code other than 0 (text) or 1 (binary)",
                    });
                }
                result_formats.push(f);
            }
            done(&b, "Bind")?;
            Frontend::Bind {
                portal,
                statement,
                result_formats,
                raw,
            }
        }
        b'D' | b'C' => {
            let what = if frame.tag == b'D' {
                "Describe"
            } else {
                "Close"
            };
            if b.is_empty() {
                return Err(FrameError::Malformed { what, why: "empty" });
            }
            let kind = b.get_u8();
            if kind != b'S' && kind != b'P' {
                return Err(FrameError::Malformed {
                    what,
                    why: "neither statement nor portal",
                });
            }
            let name = cstring(&mut b, what)?;
            done(&b, what)?;
            if frame.tag == b'D' {
                Frontend::Describe { kind, name }
            } else {
                Frontend::Close { kind, name }
            }
        }
        b'E' => {
            let portal = cstring(&mut b, "Execute")?;
            let max_rows = get_i32(&mut b, "Execute")?;
            done(&b, "Execute")?;
            Frontend::Execute { portal, max_rows }
        }
        b'S' => {
            done(&b, "Sync")?;
            Frontend::Sync
        }
        b'H' => {
            done(&b, "Flush")?;
            Frontend::Flush
        }
        b'X' => Frontend::Terminate,
        b'p' => Frontend::Password(b),
        b'd' => Frontend::CopyData(b),
        b'c' => Frontend::CopyDone,
        b'f' => Frontend::CopyFail(cstring(&mut b, "CopyFail")?),
        b'F' => Frontend::FunctionCall,
        _ => {
            return Err(FrameError::Malformed {
                what: "frontend",
                why: "unknown message type",
            });
        }
    };
    Ok(msg)
}

/// Encodes a frontend message (what the gateway sends upstream).
pub fn encode(msg: &Frontend) -> Frame {
    let mut b = BytesMut::new();
    let tag = match msg {
        Frontend::Query(sql) => {
            put_cstring(&mut b, sql);
            b'Q'
        }
        Frontend::Parse {
            name,
            sql,
            param_types,
        } => {
            put_cstring(&mut b, name);
            put_cstring(&mut b, sql);
            b.put_i16(param_types.len() as i16);
            for t in param_types {
                b.put_i32(*t);
            }
            b'P'
        }
        Frontend::Bind { raw, .. } => {
            b.put_slice(raw);
            b'B'
        }
        Frontend::Describe { kind, name } => {
            b.put_u8(*kind);
            put_cstring(&mut b, name);
            b'D'
        }
        Frontend::Execute { portal, max_rows } => {
            put_cstring(&mut b, portal);
            b.put_i32(*max_rows);
            b'E'
        }
        Frontend::Close { kind, name } => {
            b.put_u8(*kind);
            put_cstring(&mut b, name);
            b'C'
        }
        Frontend::Sync => b'S',
        Frontend::Flush => b'H',
        Frontend::Terminate => b'X',
        Frontend::Password(raw) => {
            b.put_slice(raw);
            b'p'
        }
        Frontend::CopyData(raw) => {
            b.put_slice(raw);
            b'd'
        }
        Frontend::CopyDone => b'c',
        Frontend::CopyFail(m) => {
            put_cstring(&mut b, m);
            b'f'
        }
        Frontend::FunctionCall => b'F',
    };
    Frame::new(tag, b.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let msgs = [
            Frontend::Query("SELECT 1; SELECT 2".into()),
            Frontend::Parse {
                name: "s1".into(),
                sql: "SELECT $1::int".into(),
                param_types: vec![23],
            },
            Frontend::Describe {
                kind: b'S',
                name: "s1".into(),
            },
            Frontend::Execute {
                portal: String::new(),
                max_rows: 0,
            },
            Frontend::Close {
                kind: b'P',
                name: "p".into(),
            },
            Frontend::Sync,
            Frontend::Flush,
            Frontend::CopyDone,
            Frontend::CopyFail("bad".into()),
        ];
        for m in msgs {
            assert_eq!(decode(&encode(&m)).unwrap(), m);
        }
        // Bind: portal "", statement "s1", no formats, one parameter "42", no result formats.
        let mut b = BytesMut::new();
        b.put_slice(b"\0s1\0");
        b.put_i16(0);
        b.put_i16(1);
        b.put_i32(2);
        b.put_slice(b"42");
        b.put_i16(0);
        let f = Frame::new(b'B', b.freeze());
        let Frontend::Bind { statement, .. } = decode(&f).unwrap() else {
            panic!("bind")
        };
        assert_eq!(statement, "s1");
        assert_eq!(encode(&decode(&f).unwrap()), f);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let bad: &[(u8, &[u8])] = &[
            (b'Q', b"SELECT 1"),                                // no NUL
            (b'Q', b"SELECT 1\0extra"),                         // trailing bytes
            (b'Q', b"\xff\xfe\0"),                              // invalid UTF-8
            (b'P', b"s\0SELECT 1\0"),                           // missing count
            (b'P', b"s\0SELECT 1\0\xff\xff"),                   // negative count
            (b'P', b"s\0SELECT 1\0\x00\x02\x00\x00\x00\x17"),   // two types, one present
            (b'B', b"\0s\0\x00\x00\x00\x01\x00\x00\x00\x10ab"), // parameter longer than the body
            (b'B', b"\0s\0\x00\x00\x00\x01\xff\xff\xff\xf0"),   // negative length
            (b'D', b"X\0"),
            (b'D', b""),
            (b'E', b"\0\x00"),
            (b'S', b"x"),
            (b'Z', b""), // not a frontend message
        ];
        for (tag, body) in bad {
            assert!(
                decode(&Frame::new(*tag, Bytes::copy_from_slice(body))).is_err(),
                "{} {body:?}",
                *tag as char
            );
        }
    }
}
