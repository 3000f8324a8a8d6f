//! Messages from the server that the gateway reads or writes itself: errors and notices it
//! sends to the agent, authentication requests it answers upstream, and the row messages it
//! masks (RowDescription, DataRow).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::frame::{Frame, FrameError, cstring, get_bytes, get_i16, get_i32, put_cstring};

/// The fields of an ErrorResponse or NoticeResponse that the gateway uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    /// `ERROR`, `FATAL`, `WARNING`, `NOTICE`…
    pub severity: String,
    /// SQLSTATE, e.g. `42501` (insufficient privilege).
    pub code: String,
    /// The message.
    pub message: String,
    /// More detail.
    pub detail: Option<String>,
    /// What to do about it.
    pub hint: Option<String>,
}

/// SQLSTATE codes the gateway uses.
pub mod sqlstate {
    /// The request is refused by policy.
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// The agent's credentials are wrong.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// The agent could not be authorized.
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// The message breaks the protocol.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// The statement does not parse.
    pub const SYNTAX_ERROR: &str = "42601";
    /// The gateway cannot do its job right now (policy not loaded, audit sink full).
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// The upstream could not be reached.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// Held for approval: the statement was not run.
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    /// A feature the gateway refuses.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// query_canceled
    pub const QUERY_CANCELED: &str = "57014";
    /// insufficient_resources (the audit trail cannot take more records).
    pub const INSUFFICIENT_RESOURCES: &str = "53000";
}

impl ErrorFields {
    /// An `ERROR` with a code and message.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            ..Default::default()
        }
    }

    /// A `FATAL` with a code and message (the connection ends after it).
    pub fn fatal(code: &str, message: impl Into<String>) -> Self {
        Self {
            severity: "FATAL".into(),
            ..Self::error(code, message)
        }
    }

    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds a detail.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    fn encode_with(&self, tag: u8) -> Frame {
        let mut b = BytesMut::new();
        for (code, value) in [
            (b'S', Some(&self.severity)),
            (b'V', Some(&self.severity)),
            (b'C', Some(&self.code)),
            (b'M', Some(&self.message)),
            (b'D', self.detail.as_ref()),
            (b'H', self.hint.as_ref()),
        ] {
            if let Some(v) = value {
                b.put_u8(code);
                put_cstring(&mut b, v);
            }
        }
        b.put_u8(0);
        Frame::new(tag, b.freeze())
    }

    /// An ErrorResponse (`E`).
    pub fn to_error(&self) -> Frame {
        self.encode_with(b'E')
    }

    /// A NoticeResponse (`N`).
    pub fn to_notice(&self) -> Frame {
        self.encode_with(b'N')
    }

    /// Reads an ErrorResponse or NoticeResponse body.
    pub fn decode(frame: &Frame) -> Result<Self, FrameError> {
        let mut b = frame.body.clone();
        let mut f = Self::default();
        loop {
            if b.is_empty() {
                return Err(FrameError::Malformed {
                    what: "ErrorResponse",
                    why: "no terminator",
                });
            }
            let code = b.get_u8();
            if code == 0 {
                break;
            }
            let v = cstring(&mut b, "ErrorResponse")?;
            match code {
                b'V' => f.severity = v,
                b'S' if f.severity.is_empty() => f.severity = v,
                b'C' => f.code = v,
                b'M' => f.message = v,
                b'D' => f.detail = Some(v),
                b'H' => f.hint = Some(v),
                _ => {}
            }
        }
        Ok(f)
    }
}

/// ReadyForQuery (`Z`) with the transaction status: `I` idle, `T` in a transaction, `E` failed
/// transaction.
pub fn ready_for_query(status: u8) -> Frame {
    Frame::new(b'Z', Bytes::copy_from_slice(&[status]))
}

/// AuthenticationOk.
pub fn authentication_ok() -> Frame {
    Frame::new(b'R', Bytes::from_static(&[0, 0, 0, 0]))
}

/// AuthenticationCleartextPassword: asks the agent for its password (its token).
pub fn authentication_cleartext() -> Frame {
    Frame::new(b'R', Bytes::from_static(&[0, 0, 0, 3]))
}

/// ParameterStatus.
pub fn parameter_status(name: &str, value: &str) -> Frame {
    let mut b = BytesMut::new();
    put_cstring(&mut b, name);
    put_cstring(&mut b, value);
    Frame::new(b'S', b.freeze())
}

/// BackendKeyData.
pub fn backend_key_data(pid: i32, key: &[u8]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i32(pid);
    b.put_slice(key);
    Frame::new(b'K', b.freeze())
}

/// CommandComplete.
pub fn command_complete(tag: &str) -> Frame {
    let mut b = BytesMut::new();
    put_cstring(&mut b, tag);
    Frame::new(b'C', b.freeze())
}

/// An authentication request from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// Done.
    Ok,
    /// Cleartext password.
    Cleartext,
    /// md5 with this salt.
    Md5([u8; 4]),
    /// SASL with these mechanisms.
    Sasl(Vec<String>),
    /// A SASL challenge.
    SaslContinue(Bytes),
    /// The SASL outcome.
    SaslFinal(Bytes),
    /// Anything else (Kerberos, GSS, SSPI): unsupported upstream.
    Other(i32),
}

/// Reads an `R` message.
pub fn decode_authentication(frame: &Frame) -> Result<Authentication, FrameError> {
    let mut b = frame.body.clone();
    let kind = get_i32(&mut b, "Authentication")?;
    Ok(match kind {
        0 => Authentication::Ok,
        3 => Authentication::Cleartext,
        5 => {
            let salt = get_bytes(&mut b, 4, "AuthenticationMD5Password")?;
            Authentication::Md5([salt[0], salt[1], salt[2], salt[3]])
        }
        10 => {
            let mut mechs = Vec::new();
            while b.first().is_some_and(|c| *c != 0) {
                mechs.push(cstring(&mut b, "AuthenticationSASL")?);
            }
            Authentication::Sasl(mechs)
        }
        11 => Authentication::SaslContinue(b),
        12 => Authentication::SaslFinal(b),
        other => Authentication::Other(other),
    })
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The column's name (its alias).
    pub name: String,
    /// The source table's OID, or 0 for a computed column.
    pub table_oid: u32,
    /// The column's number in that table, or 0.
    pub column: i16,
    /// The type's OID.
    pub type_oid: u32,
    /// The type's size.
    pub type_size: i16,
    /// The type modifier.
    pub type_modifier: i32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// Reads a RowDescription (`T`).
pub fn decode_row_description(frame: &Frame) -> Result<Vec<Field>, FrameError> {
    let mut b = frame.body.clone();
    let n = get_i16(&mut b, "RowDescription")?;
    if n < 0 {
        return Err(FrameError::Malformed {
            what: "RowDescription",
            why: "negative field count",
        });
    }
    let mut fields = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let name = cstring(&mut b, "RowDescription")?;
        let table_oid = get_i32(&mut b, "RowDescription")? as u32;
        let column = get_i16(&mut b, "RowDescription")?;
        let type_oid = get_i32(&mut b, "RowDescription")? as u32;
        let type_size = get_i16(&mut b, "RowDescription")?;
        let type_modifier = get_i32(&mut b, "RowDescription")?;
        let format = get_i16(&mut b, "RowDescription")?;
        fields.push(Field {
            name,
            table_oid,
            column,
            type_oid,
            type_size,
            type_modifier,
            format,
        });
    }
    if !b.is_empty() {
        return Err(FrameError::Malformed {
            what: "RowDescription",
            why: "bytes after the fields",
        });
    }
    Ok(fields)
}

/// Reads a DataRow (`D`): each value, `None` for NULL.
pub fn decode_data_row(frame: &Frame) -> Result<Vec<Option<Bytes>>, FrameError> {
    let mut b = frame.body.clone();
    let n = get_i16(&mut b, "DataRow")?;
    if n < 0 {
        return Err(FrameError::Malformed {
            what: "DataRow",
            why: "negative column count",
        });
    }
    let mut values = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = get_i32(&mut b, "DataRow")?;
        values.push(match len {
            -1 => None,
            l if l < 0 => {
                return Err(FrameError::Malformed {
                    what: "DataRow",
                    why: "negative length",
                });
            }
            l => Some(get_bytes(&mut b, l as usize, "DataRow")?),
        });
    }
    if !b.is_empty() {
        return Err(FrameError::Malformed {
            what: "DataRow",
            why: "bytes after the values",
        });
    }
    Ok(values)
}

/// Encodes a DataRow.
pub fn encode_data_row(values: &[Option<Bytes>]) -> Frame {
    let mut b = BytesMut::with_capacity(
        2 + values
            .iter()
            .map(|v| 4 + v.as_ref().map_or(0, Bytes::len))
            .sum::<usize>(),
    );
    b.put_i16(values.len() as i16);
    for v in values {
        match v {
            None => b.put_i32(-1),
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v);
            }
        }
    }
    Frame::new(b'D', b.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip() {
        let e = ErrorFields::error(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            "refused by guardrail no-drops",
        )
        .hint("ask the owning team")
        .detail("DROP TABLE orders");
        assert_eq!(ErrorFields::decode(&e.to_error()).unwrap(), e);
        assert_eq!(ErrorFields::decode(&e.to_notice()).unwrap(), e);
    }

    #[test]
    fn rows_round_trip_and_null_stays_null() {
        let row = vec![Some(Bytes::from_static(b"42")), None, Some(Bytes::new())];
        let f = encode_data_row(&row);
        assert_eq!(decode_data_row(&f).unwrap(), row);
        let mut b = BytesMut::new();
        b.put_i16(1);
        put_cstring(&mut b, "email");
        b.put_i32(16384);
        b.put_i16(3);
        b.put_i32(25);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(0);
        let fields = decode_row_description(&Frame::new(b'T', b.freeze())).unwrap();
        assert_eq!(
            (
                fields[0].name.as_str(),
                fields[0].table_oid,
                fields[0].column
            ),
            ("email", 16384, 3)
        );
    }

    #[test]
    fn malformed_server_messages_are_errors() {
        for (tag, body) in [
            (b'D', &b"\x00\x01\x00\x00\x00\x05ab"[..]),
            (b'D', &b"\x00\x01\xff\xff\xff\xfe"[..]),
            (b'D', &b"\x00\x00x"[..]),
            (b'T', &b"\x00\x01name\x00"[..]),
            (b'E', &b"Mmessage"[..]),
        ] {
            let f = Frame::new(tag, Bytes::from_static(body));
            let r = match tag {
                b'D' => decode_data_row(&f).map(|_| ()),
                b'T' => decode_row_description(&f).map(|_| ()),
                _ => ErrorFields::decode(&f).map(|_| ()),
            };
            assert!(r.is_err(), "{} {body:?}", tag as char);
        }
        assert_eq!(
            decode_authentication(&Frame::new(
                b'R',
                Bytes::from_static(&[0, 0, 0, 5, 1, 2, 3, 4])
            ))
            .unwrap(),
            Authentication::Md5([1, 2, 3, 4])
        );
        assert!(
            decode_authentication(&Frame::new(b'R', Bytes::from_static(&[0, 0, 0, 5, 1]))).is_err()
        );
    }
}
