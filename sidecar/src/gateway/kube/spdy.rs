//! Reading SPDY/3.1 (what older clients and port-forward use for exec, attach and
//! port-forward) as it passes, to record it: data frames from the agent are its input, data
//! frames from the server are output. Control frames (stream set-up, pings, window updates)
//! carry no terminal data and are skipped; their zlib-compressed headers are not needed to
//! tell input from output, since each direction carries only one of them.

/// The largest frame accepted (SPDY's length field is 24 bits).
const MAX_FRAME: usize = 1 << 24;

/// Parses one direction of a SPDY connection, fed the bytes as they pass.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    broken: bool,
}

impl Parser {
    /// Whether the stream could not be parsed.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// Feeds bytes; returns the payloads of the data frames they complete (with their
    /// stream ids).
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        if self.broken {
            return out;
        }
        self.buf.extend_from_slice(bytes);
        loop {
            if self.buf.len() < 8 {
                break;
            }
            let b = &self.buf;
            let control = b[0] & 0x80 != 0;
            let len = (usize::from(b[5]) << 16) | (usize::from(b[6]) << 8) | usize::from(b[7]);
            if control {
                let version = u16::from_be_bytes([b[0] & 0x7f, b[1]]);
                if version != 3 {
                    self.broken = true;
                    self.buf.clear();
                    break;
                }
            }
            if len > MAX_FRAME {
                self.broken = true;
                self.buf.clear();
                break;
            }
            if b.len() < 8 + len {
                break;
            }
            if !control {
                let stream = u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]);
                if len > 0 {
                    out.push((stream, b[8..8 + len].to_vec()));
                }
            }
            self.buf.drain(..8 + len);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = stream.to_be_bytes().to_vec();
        let len = payload.len() as u32;
        f.push(0);
        f.extend_from_slice(&len.to_be_bytes()[1..]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn data_frames_split_anywhere_and_control_frames_skipped() {
        let mut bytes = vec![0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x04, 1, 2, 3, 4];
        bytes.extend(data(3, b"hello\n"));
        bytes.extend(data(5, b"oops\n"));
        let mut p = Parser::default();
        let mut got = Vec::new();
        for b in &bytes {
            got.extend(p.feed(std::slice::from_ref(b)));
        }
        assert_eq!(got, vec![(3, b"hello\n".to_vec()), (5, b"oops\n".to_vec())]);
        let mut bad = Parser::default();
        assert!(
            bad.feed(&[0x80, 0x02, 0, 1, 0, 0, 0, 0]).is_empty() && bad.broken(),
            "another SPDY version"
        );
    }
}
