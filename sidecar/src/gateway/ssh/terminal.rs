//! The two byte streams of an SSH session channel, as the gateway reads them: the agent's
//! input cut into whole command lines (each checked before it reaches the host), and the
//! host's output masked a line at a time (a value split across packets is still found).

use crate::mask::{MaskSet, Masked};

/// The longest input line accepted.
pub const MAX_LINE: usize = 64 << 10;

/// Why a line typed at a terminal with a character beyond ASCII is not sent.
pub const NON_ASCII_WITH_TERMINAL: &str = "the line holds a character beyond ASCII, and with a terminal the host's line editor may read such bytes as editing keys (in the C/POSIX locale readline takes byte 0x88 as Meta-Ctrl-H, which deletes a word), so the line it would run is not the line agentgate checked: type the line in ASCII only, or run the command without a terminal (ssh HOST 'COMMAND', or ssh -T), where the shell reads it as it is";

/// What the agent's input turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A complete command (perhaps several physical lines joined: an open quote, a trailing
    /// backslash, an unfinished `if`): check `text`, then send `raw` as it is.
    Line {
        /// The command as the shell reads it (physical lines joined by `\n`).
        text: String,
        /// The bytes to send the host when the command is allowed.
        raw: Vec<u8>,
    },
    /// Bytes that pass at once: Ctrl-C (interrupt), Ctrl-D on an empty line (end of input),
    /// Ctrl-Z and Ctrl-\ (signals). They drop any line being typed.
    Control(Vec<u8>),
    /// A line that cannot be checked as the host would read it (line editing keys, tab
    /// completion, history recall, other control bytes, or too long): it is not sent.
    Refused {
        /// What was typed, printable.
        text: String,
        /// Why.
        why: String,
    },
}

/// Cuts the agent's keystrokes into lines. Editing keys that only change the line being
/// typed (Backspace, Ctrl-U, Ctrl-W) are applied here, so the host receives the final line
/// only; keys whose effect only the host knows (Tab, arrows, Ctrl-R…) make the line refused.
#[derive(Debug, Default)]
pub struct LineDiscipline {
    /// The physical line being typed.
    line: Vec<u8>,
    /// Earlier physical lines of an unfinished command, with their terminators.
    held: Vec<u8>,
    /// Why the line being typed cannot be checked, when it cannot.
    tainted: Option<String>,
    /// Inside an escape sequence: 1 after ESC, 2 inside `ESC [` / `ESC O`.
    escape: u8,
    /// The last byte was `\r` (a following `\n` belongs to the same Enter).
    after_cr: bool,
    /// No terminal: the shell reads a pipe, where only `\n` ends a line and `\r` is part of
    /// a word, so a `\r` makes the line refused rather than read two ways.
    pub no_terminal: bool,
}

/// Whether `text` is a command the shell would wait for more lines of.
pub type Incomplete = fn(&str) -> bool;

impl LineDiscipline {
    /// Feeds the agent's bytes; returns what to do with them, in order.
    pub fn feed(&mut self, bytes: &[u8], incomplete: Incomplete) -> Vec<Input> {
        let mut out = Vec::new();
        for &b in bytes {
            let after_cr = std::mem::replace(&mut self.after_cr, false);
            if self.escape == 1 {
                self.escape = if b == b'[' || b == b'O' { 2 } else { 0 };
                continue;
            }
            if self.escape == 2 {
                if (0x40..=0x7e).contains(&b) {
                    self.escape = 0;
                }
                continue;
            }
            match b {
                b'\n' if after_cr => {}
                b'\r' if self.no_terminal => {
                    self.taint("a carriage return without a terminal: the shell would read it as part of a word, not as the end of a line");
                    self.line.push(b'\r');
                }
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    out.push(self.enter(b, incomplete));
                }
                0x7f | 0x08 => {
                    // Backspace: one character (UTF-8 aware).
                    while let Some(last) = self.line.pop() {
                        if last & 0xc0 != 0x80 {
                            break;
                        }
                    }
                }
                0x15 => self.line.clear(),
                0x17 => {
                    while self.line.last().is_some_and(|c| *c == b' ') {
                        self.line.pop();
                    }
                    while self.line.last().is_some_and(|c| *c != b' ') {
                        self.line.pop();
                    }
                }
                0x03 | 0x1a | 0x1c => {
                    self.reset();
                    out.push(Input::Control(vec![b]));
                }
                0x04 => {
                    if self.line.is_empty() && self.held.is_empty() {
                        out.push(Input::Control(vec![b]));
                    }
                }
                0x0c if self.line.is_empty() && self.held.is_empty() => {
                    out.push(Input::Control(vec![b]));
                }
                0x1b => {
                    self.escape = 1;
                    self.taint("arrow, history and other editing keys are not passed");
                }
                b'\t' => self.taint("tab completion is not passed"),
                0x00..=0x1f => self.taint("control keys are not passed"),
                _ => {
                    if self.line.len() + self.held.len() >= MAX_LINE {
                        self.taint("the line is longer than 64 KiB");
                    } else {
                        self.line.push(b);
                    }
                }
            }
        }
        out
    }

    fn taint(&mut self, why: &str) {
        if self.tainted.is_none() {
            self.tainted = Some(why.to_owned());
        }
    }

    fn reset(&mut self) {
        self.line.clear();
        self.held.clear();
        self.tainted = None;
        self.escape = 0;
    }

    fn enter(&mut self, terminator: u8, incomplete: Incomplete) -> Input {
        let mut raw = std::mem::take(&mut self.held);
        raw.extend_from_slice(&self.line);
        self.line.clear();
        // As the host's terminal hands it to the shell: a carriage return is a newline (a
        // `\r` left in would join two commands into one word for the check).
        let text = String::from_utf8_lossy(&raw).replace('\r', "\n");
        // Bytes that are not UTF-8 would be checked as replacement characters while the host
        // reads them in its own way (a multi-byte locale can take a `\` into a character).
        if std::str::from_utf8(&raw).is_err() {
            self.taint("bytes that are not UTF-8");
        }
        // With a terminal the host's line editor reads the line, and in the C/POSIX locale
        // readline takes a byte of 0x80 or more as Meta plus a key (`convert-meta`): 0x88 is
        // Meta-Ctrl-H (backward-kill-word), 0xE2 Meta-b (backward-word). Such a byte edits
        // the line after it was checked, so a line the terminal would carry with one is not
        // sent, whatever the locale (the host's may be C without the agent saying so).
        let non_ascii = !self.no_terminal && !raw.is_ascii();
        if let Some(why) = self.tainted.take() {
            self.reset();
            return Input::Refused {
                text,
                why: format!(
                    "{why}: agentgate checks each whole line before it reaches the host, so type it out in full"
                ),
            };
        }
        if non_ascii {
            self.reset();
            return Input::Refused {
                text,
                why: NON_ASCII_WITH_TERMINAL.to_owned(),
            };
        }
        raw.push(terminator);
        if incomplete(&text) {
            // Wait for the rest; nothing reaches the host yet.
            self.held = raw;
            return Input::Control(Vec::new());
        }
        Input::Line { text, raw }
    }

    /// Whether an unfinished command is waiting for more lines.
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty() || !self.line.is_empty()
    }
}

/// Masks a stream of output a line at a time. A partial line waits for its end, or for
/// [`OutputMasker::flush`] when the stream pauses.
#[derive(Debug, Default)]
pub struct OutputMasker {
    pending: Vec<u8>,
    /// Values masked so far, by rule.
    pub masked: std::collections::BTreeMap<String, u64>,
    /// Inside a private key block (a `BEGIN … PRIVATE KEY` line was masked, its `END` has
    /// not come): the rule that masked it. Its body lines are masked whole.
    in_key: Option<String>,
}

/// Bytes a partial line may hold before it is masked and sent anyway.
const MAX_PENDING: usize = 64 << 10;

impl OutputMasker {
    /// Feeds output; returns what can be sent now (masked).
    pub fn feed(&mut self, masks: &MaskSet, bytes: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(bytes);
        let cut = match self.pending.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None if self.pending.len() >= MAX_PENDING => self.pending.len(),
            None => return Vec::new(),
        };
        let ready: Vec<u8> = self.pending.drain(..cut).collect();
        self.mask(masks, &ready)
    }

    /// Masks and returns what is waiting.
    pub fn flush(&mut self, masks: &MaskSet) -> Vec<u8> {
        let ready = std::mem::take(&mut self.pending);
        self.mask(masks, &ready)
    }

    /// Whether output waits for the end of its line.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn mask(&mut self, masks: &MaskSet, ready: &[u8]) -> Vec<u8> {
        if ready.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(ready.len());
        for line in ready.split_inclusive(|b| *b == b'\n') {
            // Invalid UTF-8 (binary output) is masked as text with replacement characters:
            // what passes is never a value the detectors did not see.
            let text = String::from_utf8_lossy(line);
            // A private key's body: line by line, each alone looks like nothing.
            if let Some(rule) = &self.in_key {
                *self.masked.entry(rule.clone()).or_default() += 1;
                if strip_terminal_sequences(&text).contains("-----END ") {
                    self.in_key = None;
                }
                out.extend_from_slice(b"****");
                if line.ends_with(b"\n") {
                    out.push(b'\n');
                }
                continue;
            }
            // Colours and other terminal sequences can sit inside a value (`grep --color`
            // marks what matched): detectors look at the text without them, and a line
            // with something masked is sent without them.
            let plain = strip_terminal_sequences(&text);
            let (masked, applied) = masks.mask(None, &plain);
            if let Some(begin) = plain.find("-----BEGIN ")
                && plain[begin..].contains("PRIVATE KEY")
                && !plain[begin..].contains("-----END ")
                && let Some(rule) = applied.first()
            {
                self.in_key = Some(rule.clone());
            }
            for rule in applied {
                *self.masked.entry(rule).or_default() += 1;
            }
            match masked {
                Masked::Clear => out.extend_from_slice(line),
                Masked::Text(t) => out.extend_from_slice(t.as_bytes()),
                Masked::Null => {}
            }
        }
        out
    }
}

/// `text` without terminal control sequences (CSI `ESC [ … final`, OSC `ESC ] … BEL` or
/// `ESC \`, and two-byte `ESC x`).
fn strip_terminal_sequences(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('\u{1b}') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                        chars.next();
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: &str) -> bool {
        false
    }

    fn open_quote(t: &str) -> bool {
        t.matches('"').count() % 2 == 1
    }

    #[test]
    fn lines_are_cut_at_enter_with_editing_applied() {
        let mut d = LineDiscipline::default();
        let out = d.feed(b"lx\x7fs -l\r", never);
        assert_eq!(
            out,
            vec![Input::Line {
                text: "ls -l".into(),
                raw: b"ls -l\r".to_vec()
            }]
        );
        let out = d.feed(b"rm -rf /\x15echo hi\r\n", never);
        assert_eq!(
            out,
            vec![Input::Line {
                text: "echo hi".into(),
                raw: b"echo hi\r".to_vec()
            }]
        );
        let out = d.feed(b"echo one two\x17three\n", never);
        assert_eq!(
            out,
            vec![Input::Line {
                text: "echo one three".into(),
                raw: b"echo one three\n".to_vec()
            }]
        );
    }

    #[test]
    fn editing_keys_only_the_host_understands_refuse_the_line() {
        let mut d = LineDiscipline::default();
        for input in [&b"shutd\t\r"[..], b"\x1b[A\r", b"ls\x12x\r", b"x\x19\r"] {
            let out = d.feed(input, never);
            assert!(
                matches!(out.as_slice(), [Input::Refused { .. }]),
                "{input:?}: {out:?}"
            );
        }
        // The next line is fine again.
        assert!(matches!(
            d.feed(b"ls\r", never).as_slice(),
            [Input::Line { .. }]
        ));
    }

    #[test]
    fn an_unfinished_command_is_held_until_complete() {
        let mut d = LineDiscipline::default();
        assert_eq!(
            d.feed(b"echo \"a\r", open_quote),
            vec![Input::Control(vec![])]
        );
        assert!(d.is_holding());
        assert_eq!(
            d.feed(b"b\"\r", open_quote),
            vec![Input::Line {
                text: "echo \"a\nb\"".into(),
                raw: b"echo \"a\rb\"\r".to_vec()
            }]
        );
    }

    #[test]
    fn interrupts_pass_and_drop_the_line() {
        let mut d = LineDiscipline::default();
        assert_eq!(d.feed(b"rm -rf \x03", never), vec![Input::Control(vec![3])]);
        assert_eq!(
            d.feed(b"/\r", never),
            vec![Input::Line {
                text: "/".into(),
                raw: b"/\r".to_vec()
            }]
        );
        assert_eq!(d.feed(b"\x04", never), vec![Input::Control(vec![4])]);
    }

    #[test]
    fn output_values_split_across_packets_are_masked() {
        let v: serde_json::Value = serde_norway::from_str(
            "apiVersion: agentgate.dev/v1alpha1\nkind: MaskPolicy\nmetadata: { name: pii }\nspec:\n  rules:\n    - { name: emails, detectors: [Email], action: Redact }\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let p: agentgate_crds::MaskPolicy =
            serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        let set = MaskSet::compile(&[&p], &|_| None).unwrap_or_else(|e| panic!("{e}"));
        let mut m = OutputMasker::default();
        let mut out = m.feed(&set, b"user alice@exa");
        assert!(out.is_empty());
        out.extend(m.feed(&set, b"mple.com logged in\nnext"));
        out.extend(m.flush(&set));
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("alice@example.com"), "{text}");
        assert!(text.ends_with("logged in\nnext"), "{text}");
        assert_eq!(m.masked.values().sum::<u64>(), 1);
        // Colours inside the value (grep --color).
        let out = m.feed(&set, b"creds: \x1b[01;31malice\x1b[m@example.com\n");
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("alice"), "{text}");
        let out = m.feed(&set, b"\x1b[32mok\x1b[0m\n");
        assert_eq!(out, b"\x1b[32mok\x1b[0m\n");
    }

    #[test]
    fn lines_that_are_not_utf8_are_refused() {
        let mut d = LineDiscipline::default();
        let out = d.feed(b"echo \"\x95\x5c\" ; id\r", never);
        assert!(
            matches!(&out[..], [Input::Refused { why, .. }] if why.starts_with("bytes that are not UTF-8")),
            "{out:?}"
        );
        // The next line is checked as usual.
        let out = d.feed(b"echo cafe\r", never);
        assert!(matches!(&out[..], [Input::Line { .. }]), "{out:?}");
    }

    #[test]
    fn with_a_terminal_only_ascii_lines_are_sent() {
        // U+2000 and U+2008 are E2 80 80 and E2 80 88: in the C locale readline reads 0xE2
        // as Meta-b and 0x88 as Meta-Ctrl-H, moving back and deleting a word after the check.
        let typed = "echo sudo id\u{2000}\u{2008}\r";
        let mut d = LineDiscipline::default();
        let out = d.feed(typed.as_bytes(), never);
        assert!(
            matches!(&out[..], [Input::Refused { why, .. }] if why == NON_ASCII_WITH_TERMINAL),
            "{out:?}"
        );
        // Any byte of 0x80 or more, also in a continued line, and C1 controls.
        for typed in [
            "echo caf\u{e9}\r".as_bytes(),
            b"echo \"a\r\xc2\x88\"\r",
            b"ls \xc2\x9b\r",
        ] {
            let out = d.feed(typed, open_quote);
            assert!(
                matches!(&out[..], [.., Input::Refused { why, .. }] if why == NON_ASCII_WITH_TERMINAL),
                "{typed:?}: {out:?}"
            );
            assert!(!d.is_holding());
        }
        // Typed and erased again: the line sent is ASCII.
        let out = d.feed("echo x\u{e9}\x7f\r".as_bytes(), never);
        assert_eq!(
            out,
            vec![Input::Line {
                text: "echo x".into(),
                raw: b"echo x\r".to_vec()
            }]
        );
        // Without a terminal the shell reads the bytes as they are: UTF-8 passes.
        let mut d = LineDiscipline {
            no_terminal: true,
            ..Default::default()
        };
        let out = d.feed("echo caf\u{e9}\n".as_bytes(), never);
        assert!(matches!(&out[..], [Input::Line { .. }]), "{out:?}");
    }

    #[test]
    fn a_private_keys_body_is_masked_line_by_line() {
        let v: serde_json::Value = serde_norway::from_str(
            "apiVersion: agentgate.dev/v1alpha1\nkind: MaskPolicy\nmetadata: { name: keys }\nspec:\n  rules:\n    - { name: keys, detectors: [PrivateKey], action: Redact }\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let p: agentgate_crds::MaskPolicy =
            serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        let set = MaskSet::compile(&[&p], &|_| None).unwrap_or_else(|e| panic!("{e}"));
        let mut m = OutputMasker::default();
        let mut out = m.feed(
            &set,
            b"$ cat id_ed25519\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1r",
        );
        out.extend(m.feed(
            &set,
            b"ZXktdjEAAAAA\nQyNTUxOQAAACD\n-----END OPENSSH PRIVATE KEY-----\n$ ls\nfile\n",
        ));
        out.extend(m.flush(&set));
        let text = String::from_utf8_lossy(&out);
        for secret in ["b3BlbnNzaC1r", "ZXktdjEAAAAA", "QyNTUxOQAAACD"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(text.starts_with("$ cat id_ed25519\n"), "{text}");
        assert!(text.ends_with("$ ls\nfile\n"), "{text}");
    }
}
