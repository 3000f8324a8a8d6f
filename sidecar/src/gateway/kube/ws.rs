//! Reading the Kubernetes streaming protocols inside a WebSocket connection (exec, attach,
//! port-forward), to record them: frames are parsed as they pass (the bytes themselves are
//! relayed unchanged), and each message's channel tells stdin from stdout, stderr, the
//! error channel and terminal resizes.
//!
//! `v4.channel.k8s.io`/`v5.channel.k8s.io`: binary messages whose first byte is the channel;
//! `base64.channel.k8s.io` variants: text messages whose first character is the channel digit
//! and whose rest is base64.

use base64::Engine;

/// The largest WebSocket message payload kept for recording (longer ones are cut).
const MAX_MESSAGE: usize = 1 << 20;

/// One message read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The Kubernetes channel: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize (for exec and
    /// attach); for port-forward, data and error channels per port.
    pub channel: u8,
    /// The payload (decoded from base64 in the base64 protocols).
    pub data: Vec<u8>,
}

/// Parses one direction of a WebSocket connection, fed the bytes as they pass.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    base64: bool,
    /// The message being assembled from fragments, and whether it is text.
    message: Option<(Vec<u8>, bool)>,
    /// A protocol error: the rest is not parsed.
    broken: bool,
}

impl Parser {
    /// A parser for a connection that agreed on `protocol` (`Sec-WebSocket-Protocol`).
    pub fn new(protocol: &str) -> Self {
        Self {
            base64: protocol.starts_with("base64."),
            ..Default::default()
        }
    }

    /// Whether the stream could not be parsed (what follows is not recorded by channel).
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// Feeds bytes; returns the whole messages they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        if self.broken {
            return out;
        }
        self.buf.extend_from_slice(bytes);
        loop {
            match self.frame() {
                Ok(Some(m)) => out.extend(m),
                Ok(None) => break,
                Err(()) => {
                    self.broken = true;
                    self.buf.clear();
                    break;
                }
            }
        }
        out
    }

    /// Takes one whole frame from the buffer: `Ok(None)` when it is not all there yet, and
    /// `Ok(Some(message))` with the message it completes, if any.
    #[allow(clippy::type_complexity)]
    fn frame(&mut self) -> Result<Option<Option<Message>>, ()> {
        let b = &self.buf;
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        let opcode = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let mut len = u64::from(b[1] & 0x7f);
        let mut at = 2usize;
        if len == 126 {
            if b.len() < 4 {
                return Ok(None);
            }
            len = u64::from(u16::from_be_bytes([b[2], b[3]]));
            at = 4;
        } else if len == 127 {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut eight = [0u8; 8];
            eight.copy_from_slice(&b[2..10]);
            len = u64::from_be_bytes(eight);
            at = 10;
        }
        let key = if masked {
            if b.len() < at + 4 {
                return Ok(None);
            }
            let k = [b[at], b[at + 1], b[at + 2], b[at + 3]];
            at += 4;
            Some(k)
        } else {
            None
        };
        let len = usize::try_from(len).map_err(|_| ())?;
        if len > (64 << 20) {
            return Err(());
        }
        if b.len() < at + len {
            return Ok(None);
        }
        let mut payload = b[at..at + len].to_vec();
        if let Some(k) = key {
            for (i, x) in payload.iter_mut().enumerate() {
                *x ^= k[i % 4];
            }
        }
        self.buf.drain(..at + len);
        let message = match opcode {
            // Continuation.
            0x0 => {
                let Some((mut data, text)) = self.message.take() else {
                    return Err(());
                };
                if data.len() < MAX_MESSAGE {
                    data.extend_from_slice(&payload);
                }
                if fin {
                    Some((data, text))
                } else {
                    self.message = Some((data, text));
                    None
                }
            }
            0x1 | 0x2 => {
                let text = opcode == 0x1;
                if fin {
                    Some((payload, text))
                } else {
                    self.message = Some((payload, text));
                    None
                }
            }
            // Close, ping, pong.
            0x8..=0xa => None,
            _ => return Err(()),
        };
        Ok(Some(
            message.and_then(|(data, text)| self.decode(data, text)),
        ))
    }

    fn decode(&self, data: Vec<u8>, text: bool) -> Option<Message> {
        let (&first, rest) = data.split_first()?;
        if self.base64 || text {
            let channel = first.checked_sub(b'0')?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .unwrap_or_else(|_| rest.to_vec());
            Some(Message {
                channel,
                data: decoded,
            })
        } else {
            Some(Message {
                channel: first,
                data: rest.to_vec(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, fin: bool, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let mask_bit = if key.is_some() { 0x80 } else { 0 };
        if payload.len() < 126 {
            f.push(mask_bit | payload.len() as u8);
        } else if payload.len() < 65536 {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        match key {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    #[test]
    fn channels_fragments_masks_and_split_reads() {
        let mut p = Parser::new("v5.channel.k8s.io");
        let mut bytes = frame(2, true, b"\x01hello\n", None);
        bytes.extend(frame(2, false, b"\x02err", None));
        bytes.extend(frame(9, true, b"", None));
        bytes.extend(frame(0, true, b"or\n", None));
        let big = vec![b'x'; 70_000];
        let mut big_msg = vec![1u8];
        big_msg.extend_from_slice(&big);
        bytes.extend(frame(2, true, &big_msg, None));
        // Fed a byte at a time, as the network may split it.
        let mut got = Vec::new();
        for b in &bytes {
            got.extend(p.feed(std::slice::from_ref(b)));
        }
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0],
            Message {
                channel: 1,
                data: b"hello\n".to_vec()
            }
        );
        assert_eq!(
            got[1],
            Message {
                channel: 2,
                data: b"error\n".to_vec()
            }
        );
        assert_eq!(got[2].data.len(), 70_000);
        // The client's frames are masked.
        let mut client = Parser::new("v5.channel.k8s.io");
        let got = client.feed(&frame(2, true, b"\x00ls -la\r", Some([1, 2, 3, 4])));
        assert_eq!(
            got,
            vec![Message {
                channel: 0,
                data: b"ls -la\r".to_vec()
            }]
        );
        // base64 protocols.
        let mut b64 = Parser::new("base64.channel.k8s.io");
        let got = b64.feed(&frame(1, true, b"1aGk=", None));
        assert_eq!(
            got,
            vec![Message {
                channel: 1,
                data: b"hi".to_vec()
            }]
        );
        // Garbage breaks the parser without a panic.
        let mut bad = Parser::new("v4.channel.k8s.io");
        assert!(bad.feed(&[0x83, 0x00]).is_empty());
        assert!(bad.broken());
        let mut bad = Parser::new("v4.channel.k8s.io");
        assert!(bad.feed(&frame(0, true, b"x", None)).is_empty());
        assert!(bad.broken());
    }
}
