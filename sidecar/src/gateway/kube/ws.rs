//! Reading the Kubernetes streaming protocols inside a WebSocket connection (exec, attach,
//! port-forward), to record them: frames are parsed as they pass (the bytes themselves are
//! relayed unchanged), and each message's channel tells stdin from stdout, stderr, the
//! error channel and terminal resizes.
//!
//! `v4.channel.k8s.io`/`v5.channel.k8s.io`: binary messages whose first byte is the channel;
//! `base64.channel.k8s.io` variants: text messages whose first character is the channel digit
//! and whose rest is base64.

use crate::gateway::ssh::terminal::OutputMasker;
use crate::mask::MaskSet;
use base64::Engine;

/// A message longer than this is recorded in parts as it arrives.
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

/// The exec and attach subprotocols agentgate reads (the API server's and the kubelet's):
/// binary channels, and the base64 ones (`v4.base64.channel.k8s.io` is base64 too).
pub const TERMINAL_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "v3.base64.channel.k8s.io",
    "v2.base64.channel.k8s.io",
    "base64.channel.k8s.io",
    // None agreed: the server speaks the binary channel protocol.
    "",
];

impl Parser {
    /// A parser for a connection that agreed on `protocol` (`Sec-WebSocket-Protocol`).
    pub fn new(protocol: &str) -> Self {
        Self {
            base64: protocol.ends_with("base64.channel.k8s.io"),
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
                data.extend_from_slice(&payload);
                if fin {
                    Some((data, text))
                } else if data.len() > MAX_MESSAGE {
                    // A long message is recorded in parts, never cut.
                    self.message = Some((data[..1].to_vec(), text));
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
        // The channel is read as the server reads it: by the agreed protocol, whatever the
        // frame's type (a text frame on a binary protocol still names its channel in its
        // first byte).
        let _ = text;
        let (&first, rest) = data.split_first()?;
        if self.base64 {
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

/// The length of the whole frame at the start of `b`, once it is all there.
fn frame_len(b: &[u8]) -> Option<usize> {
    let second = *b.get(1)?;
    let (len, mut at): (usize, usize) = match second & 0x7f {
        126 => (usize::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?])), 4),
        127 => {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(b.get(2..10)?);
            (usize::try_from(u64::from_be_bytes(eight)).ok()?, 10)
        }
        n => (usize::from(n), 2),
    };
    if second & 0x80 != 0 {
        at += 4;
    }
    let total = at.checked_add(len)?;
    (b.len() >= total).then_some(total)
}

/// Encodes one unmasked (server-to-client) WebSocket frame.
fn encode_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n < 65_536 => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Rewrites the server's side of a terminal session so the agent gets its output masked:
/// frames are parsed as they pass, stdout and stderr are masked a line at a time (a value is
/// never split between two maskings: a partial line waits for its end, or for
/// [`Reframer::flush`] when the stream pauses), and everything else is relayed as it came.
pub struct Reframer<'a> {
    parser: Parser,
    masks: &'a MaskSet,
    /// Per channel (1 stdout, 2 stderr): the SSH gateway's line masker (a partial line
    /// waits; a private key's body is masked line by line; terminal sequences inside a value
    /// do not hide it).
    maskers: [OutputMasker; 2],
}

impl<'a> Reframer<'a> {
    /// A reframer for a connection that agreed on `protocol`, masking with `masks`.
    pub fn new(protocol: &str, masks: &'a MaskSet) -> Self {
        Self {
            parser: Parser::new(protocol),
            masks,
            maskers: [OutputMasker::default(), OutputMasker::default()],
        }
    }

    /// Values masked so far, by rule.
    pub fn masked(&self) -> std::collections::BTreeMap<String, u64> {
        let mut all = self.maskers[0].masked.clone();
        for (k, v) in &self.maskers[1].masked {
            *all.entry(k.clone()).or_default() += v;
        }
        all
    }

    /// Whether the server's frames could not be read (the session cannot go on masked).
    pub fn broken(&self) -> bool {
        self.parser.broken
    }

    /// Whether output waits for the end of its line.
    pub fn has_pending(&self) -> bool {
        self.maskers.iter().any(OutputMasker::has_pending)
    }

    /// Sends `masked` (output already masked) on `channel`.
    fn emit(&self, channel: u8, masked: Vec<u8>, out: &mut Vec<u8>, sent: &mut Vec<Message>) {
        if masked.is_empty() {
            return;
        }
        let masked = String::from_utf8_lossy(&masked).into_owned();
        let mut payload = Vec::with_capacity(masked.len() + 4);
        if self.parser.base64 {
            payload.push(b'0' + channel);
            payload.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(masked.as_bytes())
                    .as_bytes(),
            );
            encode_frame(0x1, &payload, out);
        } else {
            payload.push(channel);
            payload.extend_from_slice(masked.as_bytes());
            encode_frame(0x2, &payload, out);
        }
        sent.push(Message {
            channel,
            data: masked.into_bytes(),
        });
    }

    /// Feeds the server's bytes; returns what to send the agent and the output messages sent
    /// (masked, for the record).
    pub fn feed(&mut self, bytes: &[u8]) -> (Vec<u8>, Vec<Message>) {
        let mut out = Vec::new();
        let mut sent = Vec::new();
        if self.parser.broken {
            // Unreadable: nothing more is relayed (it could not be masked).
            return (out, sent);
        }
        self.parser.buf.extend_from_slice(bytes);
        loop {
            // The frame's own bytes, for relaying it as it came.
            let raw: Vec<u8> = match frame_len(&self.parser.buf) {
                Some(n) => self.parser.buf[..n].to_vec(),
                None => Vec::new(),
            };
            match self.parser.frame() {
                Ok(None) => break,
                Err(()) => {
                    self.parser.broken = true;
                    self.parser.buf.clear();
                    break;
                }
                Ok(Some(message)) => {
                    let raw = raw.as_slice();
                    let opcode = raw.first().map_or(0, |b| b & 0x0f);
                    match message {
                        Some(m) if m.channel == 1 || m.channel == 2 => {
                            let i = usize::from(m.channel - 1);
                            let masked = self.maskers[i].feed(self.masks, &m.data);
                            self.emit(m.channel, masked, &mut out, &mut sent);
                        }
                        // The error channel, and fragments of a message not yet whole: the
                        // error channel's status follows the output it ends, so what waits
                        // is sent first.
                        Some(m) if m.channel == 3 => {
                            self.flush_into(&mut out, &mut sent);
                            out.extend_from_slice(raw);
                        }
                        // A server sends output on no other channel: what it would carry
                        // could not be masked, so it is dropped.
                        Some(m) => {
                            tracing::debug!(
                                channel = m.channel,
                                "an exec message on an unknown channel was dropped"
                            );
                        }
                        None if matches!(opcode, 0x0..=0x2) => {
                            // A fragment: its message is relayed (masked) when whole.
                        }
                        // A Close ends the session: what waits for its line end goes first.
                        None if opcode == 0x8 => {
                            self.flush_into(&mut out, &mut sent);
                            out.extend_from_slice(raw);
                        }
                        None => out.extend_from_slice(raw),
                    }
                }
            }
        }
        (out, sent)
    }

    fn flush_into(&mut self, out: &mut Vec<u8>, sent: &mut Vec<Message>) {
        for i in 0..2 {
            let masked = self.maskers[i].flush(self.masks);
            self.emit(i as u8 + 1, masked, out, sent);
        }
    }

    /// Sends the output that waits for the end of its line (the stream paused, e.g. at a
    /// prompt).
    pub fn flush(&mut self) -> (Vec<u8>, Vec<Message>) {
        let mut out = Vec::new();
        let mut sent = Vec::new();
        self.flush_into(&mut out, &mut sent);
        (out, sent)
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

    fn emails() -> MaskSet {
        let p: agentgate_crds::MaskPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "MaskPolicy",
            "metadata": { "name": "pii" },
            "spec": { "rules": [ { "name": "emails", "detectors": ["Email", "PrivateKey"], "action": "Redact" } ] }
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        MaskSet::compile(&[&p], &|_| None).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn versioned_base64_output_is_masked_and_unknown_channels_are_dropped() {
        use base64::Engine;
        let masks = emails();
        let mut r = Reframer::new("v4.base64.channel.k8s.io", &masks);
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut bytes = frame(
            1,
            true,
            format!("1{}", b64("owner: alice@example.com\n")).as_bytes(),
            None,
        );
        bytes.extend(frame(
            1,
            true,
            format!("7{}", b64("bob@example.com\n")).as_bytes(),
            None,
        ));
        bytes.extend(frame(1, true, format!("3{}", b64("{}")).as_bytes(), None));
        let out = r.feed(&bytes).0;
        let got = Parser::new("v4.base64.channel.k8s.io").feed(&out);
        let text: Vec<(u8, String)> = got
            .iter()
            .map(|m| (m.channel, String::from_utf8_lossy(&m.data).into_owned()))
            .collect();
        assert_eq!(
            text,
            [(1, "owner: ****\n".to_owned()), (3, "{}".to_owned())]
        );
        // And a binary stream's unknown channel too.
        let mut r = Reframer::new("v5.channel.k8s.io", &masks);
        let out = r.feed(&frame(2, true, b"\x05carol@example.com\n", None)).0;
        assert!(Parser::new("v5.channel.k8s.io").feed(&out).is_empty());
    }

    #[test]
    fn output_is_masked_a_line_at_a_time_even_when_a_value_is_split() {
        let masks = emails();
        let mut r = Reframer::new("v5.channel.k8s.io", &masks);
        let mut bytes = frame(2, true, b"\x01owner: alice@exa", None);
        bytes.extend(frame(9, true, b"", None));
        bytes.extend(frame(2, true, b"\x01mple.com\nnext", None));
        bytes.extend(frame(2, true, b"\x03{\"status\":\"Success\"}", None));
        let mut out = Vec::new();
        for b in &bytes {
            out.extend(r.feed(std::slice::from_ref(b)).0);
        }
        let mut agent = Parser::new("v5.channel.k8s.io");
        let got = agent.feed(&out);
        assert_eq!(
            got,
            vec![
                Message {
                    channel: 1,
                    data: b"owner: ****\n".to_vec()
                },
                Message {
                    channel: 1,
                    data: b"next".to_vec()
                },
                Message {
                    channel: 3,
                    data: b"{\"status\":\"Success\"}".to_vec()
                },
            ]
        );
        // A private key's body is masked line by line; colours inside a value do not hide it.
        let mut out = Vec::new();
        for chunk in [
            &b"\x01-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE\nQyNTUxOQAAACD\n"[..],
            &b"\x01-----END OPENSSH PRIVATE KEY-----\nowner: bob@exa\x1b[0mmple.com\n"[..],
        ] {
            out.extend(r.feed(&frame(2, true, chunk, None)).0);
        }
        let text: Vec<u8> = Parser::new("v5.channel.k8s.io")
            .feed(&out)
            .into_iter()
            .flat_map(|m| m.data)
            .collect();
        let text = String::from_utf8_lossy(&text);
        assert!(
            !text.contains("b3BlbnNzaC1r")
                && !text.contains("QyNTUxOQ")
                && !text.contains("bob@exa"),
            "{text}"
        );
        // A pause sends a partial line (a prompt).
        let (o, sent) = r.feed(&frame(2, true, b"\x01$ ", None));
        assert!(o.is_empty() && sent.is_empty() && r.has_pending());
        let (o, _) = r.flush();
        assert_eq!(
            Parser::new("v5.channel.k8s.io").feed(&o),
            vec![Message {
                channel: 1,
                data: b"$ ".to_vec()
            }]
        );
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
        // On a binary protocol a text frame still names its channel in its first byte.
        let mut text_frame = Parser::new("v5.channel.k8s.io");
        let got = text_frame.feed(&frame(1, true, b"\x00id\n", Some([9, 8, 7, 6])));
        assert_eq!(
            got,
            vec![Message {
                channel: 0,
                data: b"id\n".to_vec()
            }]
        );
        // base64 protocols, versioned or not.
        for protocol in ["base64.channel.k8s.io", "v4.base64.channel.k8s.io"] {
            let mut b64 = Parser::new(protocol);
            let got = b64.feed(&frame(1, true, b"1aGk=", None));
            assert_eq!(
                got,
                vec![Message {
                    channel: 1,
                    data: b"hi".to_vec()
                }],
                "{protocol}"
            );
        }
        // Garbage breaks the parser without a panic.
        let mut bad = Parser::new("v4.channel.k8s.io");
        assert!(bad.feed(&[0x83, 0x00]).is_empty());
        assert!(bad.broken());
        let mut bad = Parser::new("v4.channel.k8s.io");
        assert!(bad.feed(&frame(0, true, b"x", None)).is_empty());
        assert!(bad.broken());
    }
}
