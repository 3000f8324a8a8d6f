//! SFTP (version 3, as OpenSSH speaks it) read as it passes: packets framed, and the
//! requests that name a file (open, remove, rename, mkdir, setstat…) described, so each is
//! decided and recorded; a refused one is answered with a `STATUS` the agent's client shows.

/// The largest packet accepted (OpenSSH's own limit is 256 KiB).
pub const MAX_PACKET: usize = 1 << 20;
/// `SSH_FX_PERMISSION_DENIED`.
pub const PERMISSION_DENIED: u32 = 3;

/// Cuts a byte stream into whole SFTP packets (length prefix included).
#[derive(Debug, Default)]
pub struct Framer {
    buf: bytes::BytesMut,
}

impl Framer {
    /// Adds bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole packet, if one is in; `Err` when the stream is not SFTP.
    pub fn packet(&mut self) -> Result<Option<bytes::Bytes>, String> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len == 0 || len > MAX_PACKET {
            return Err(format!("an SFTP packet of {len} bytes"));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        Ok(Some(self.buf.split_to(4 + len).freeze()))
    }
}

/// The name of an [`Op`] that could not be read.
pub const MALFORMED: &str = "malformed request";

/// A request that names a file or changes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// The request id (a refusal answers it).
    pub id: u32,
    /// `open`, `remove`, `rename`, `mkdir`, `rmdir`, `setstat`, `symlink`, `opendir`, or an
    /// extension's name.
    pub name: String,
    /// The paths it names.
    pub paths: Vec<String>,
    /// Whether it reads file contents.
    pub reads: bool,
    /// Whether it changes anything.
    pub writes: bool,
    /// Whether it sets a setuid or setgid permission bit.
    pub setid: bool,
    /// Whether it sets the owner or group (chown).
    pub chown: bool,
    /// The handle it acts on (`fsetstat`): its path is what the handle was opened with.
    pub handle: Option<Vec<u8>>,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u32(&mut self) -> Option<u32> {
        if self.0.len() < 4 {
            return None;
        }
        let (n, rest) = self.0.split_at(4);
        self.0 = rest;
        Some(u32::from_be_bytes([n[0], n[1], n[2], n[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let hi = u64::from(self.u32()?);
        let lo = u64::from(self.u32()?);
        Some(hi << 32 | lo)
    }

    /// Reads an ATTRS structure: whether its permissions carry setuid or setgid, and
    /// whether it sets an owner or group.
    fn attrs(&mut self) -> Option<(bool, bool)> {
        let flags = self.u32()?;
        if flags & 0x1 != 0 {
            self.u64()?;
        }
        let chown = flags & 0x2 != 0;
        if chown {
            self.u32()?;
            self.u32()?;
        }
        if flags & 0x4 != 0 {
            return Some((self.u32()? & 0o6000 != 0, chown));
        }
        Some((false, chown))
    }

    fn bytes(&mut self) -> Option<Vec<u8>> {
        let len = self.u32()? as usize;
        if self.0.len() < len {
            return None;
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(s.to_vec())
    }

    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if self.0.len() < len {
            return None;
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(String::from_utf8_lossy(s).into_owned())
    }
}

impl Op {
    /// Reads a whole packet (as [`Framer::next`] returns it); `None` for requests on open
    /// handles, stats, directory reads and anything else that names no new file.
    pub fn parse(packet: &[u8]) -> Option<Self> {
        let mut r = Reader(packet.get(4..)?);
        let kind = r.u8()?;
        if kind == 1 {
            return None; // INIT
        }
        let id = r.u32()?;
        match Self::fields(kind, id, &mut r) {
            Some(op) => op,
            // A request that should name a file but cannot be read is refused, never
            // passed: the host might read it differently.
            None if matches!(kind, 3 | 9 | 10 | 11 | 13 | 14 | 15 | 18 | 20 | 200) => Some(Self {
                id,
                name: MALFORMED.to_owned(),
                paths: Vec::new(),
                reads: true,
                writes: true,
                setid: true,
                chown: true,
                handle: None,
            }),
            None => None,
        }
    }

    /// `Some(None)`: a request naming no file; `None`: a malformed one.
    fn fields(kind: u8, id: u32, r: &mut Reader<'_>) -> Option<Option<Self>> {
        let op = |name: &str, paths: Vec<String>, reads: bool, writes: bool| Self {
            id,
            name: name.to_owned(),
            paths,
            reads,
            writes,
            setid: false,
            chown: false,
            handle: None,
        };
        Some(Some(match kind {
            3 => {
                let path = r.string()?;
                let flags = r.u32()?;
                // Unreadable attributes count as setting the bit (fail closed).
                let (setid, chown) = r.attrs().unwrap_or((true, true));
                // READ 1, WRITE 2, APPEND 4, CREAT 8, TRUNC 0x10. sftp-server opens a file
                // for reading unless WRITE is set, whatever else is: that is a read.
                Self {
                    setid,
                    chown,
                    ..op(
                        "open",
                        vec![path],
                        flags & 1 != 0 || flags & 2 == 0,
                        flags & 0x1e != 0,
                    )
                }
            }
            9 => {
                let path = r.string()?;
                let (setid, chown) = r.attrs()?;
                Self {
                    setid,
                    chown,
                    ..op("setstat", vec![path], false, true)
                }
            }
            10 => {
                let handle = r.bytes()?;
                let (setid, chown) = r.attrs()?;
                Self {
                    setid,
                    chown,
                    handle: Some(handle),
                    ..op("fsetstat", vec![], false, true)
                }
            }
            11 => op("opendir", vec![r.string()?], false, false),
            13 => op("remove", vec![r.string()?], false, true),
            14 => op("mkdir", vec![r.string()?], false, true),
            15 => op("rmdir", vec![r.string()?], false, true),
            18 => op("rename", vec![r.string()?, r.string()?], false, true),
            20 => op("symlink", vec![r.string()?, r.string()?], false, true),
            200 => {
                let name = r.string()?;
                match name.as_str() {
                    "statvfs@openssh.com"
                    | "fstatvfs@openssh.com"
                    | "limits@openssh.com"
                    | "expand-path@openssh.com"
                    | "home-directory"
                    | "users-groups-by-id@openssh.com"
                    | "fsync@openssh.com" => return Some(None),
                    "posix-rename@openssh.com" => {
                        op("rename", vec![r.string()?, r.string()?], false, true)
                    }
                    "hardlink@openssh.com" => {
                        op("link", vec![r.string()?, r.string()?], false, true)
                    }
                    "lsetstat@openssh.com" => {
                        let path = r.string()?;
                        let (setid, chown) = r.attrs()?;
                        Self {
                            setid,
                            chown,
                            ..op("lsetstat", vec![path], false, true)
                        }
                    }
                    // An extension agentgate does not know may change anything.
                    _ => op(&name, vec![], false, true),
                }
            }
            _ => return Some(None),
        }))
    }

    /// The request as records, guardrails and scopes show it: `sftp put /tmp/x`,
    /// `sftp get /etc/hosts`, `sftp remove ~/x` (paths as [`shown_path`] writes them).
    pub fn describe(&self) -> String {
        let verb = match (self.name.as_str(), self.reads, self.writes) {
            ("open", true, true) => "open",
            ("open", true, false) => "get",
            ("open", false, _) => "put",
            (n, _, _) => n,
        };
        let mut s = format!("sftp {verb}");
        for (i, p) in self.paths.iter().enumerate() {
            s.push(' ');
            // A symbolic link's relative target is read from the link's directory, not the
            // home directory: it is shown as sent.
            if self.name == "symlink" && i == 0 && !p.starts_with('/') {
                s.push_str(p);
            } else {
                s.push_str(&shown_path(p));
            }
        }
        s
    }
}

/// A path of an SFTP request as records and scopes see it: a relative path is in the
/// login's home directory, where the server starts (`reports/a` is `~/reports/a`); empty
/// and `.` segments and repeated slashes are dropped. A `..` segment is kept: where it
/// leads is the host's to resolve (through links the gateway cannot see), and a scope's
/// `*` never stands for one, so `sftp get /srv/reports/*` does not allow
/// `sftp get /srv/reports/../../etc/shadow`.
pub fn shown_path(p: &str) -> String {
    let (root, rest) = match p.strip_prefix('/') {
        Some(rest) => ("/", rest),
        None => ("~/", p),
    };
    let segments: Vec<&str> = rest
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    if segments.is_empty() {
        return if root == "/" { "/" } else { "~" }.to_owned();
    }
    format!("{root}{}", segments.join("/"))
}

/// The most handles remembered per channel (OpenSSH's sftp-server allows 512 open at once).
const MAX_HANDLES: usize = 4096;

/// Which path each open handle names, so that requests on a handle (`fsetstat`) are decided
/// by the file they change. Learnt from the agent's `OPEN`/`OPENDIR` and the host's
/// `HANDLE` answers; forgotten at `CLOSE`.
#[derive(Debug, Default)]
pub struct Handles {
    /// Opens waiting for their answer; `None` when two share a request id (which answer
    /// is whose cannot be told, so neither handle is known).
    pending: std::collections::HashMap<u32, Option<String>>,
    open: std::collections::HashMap<Vec<u8>, String>,
}

impl Handles {
    /// Notes a request the agent sent on (allowed): an open's path until its answer, a
    /// close's handle forgotten.
    pub fn request(&mut self, packet: &[u8]) {
        let Some((kind, id, mut r)) = head(packet) else {
            return;
        };
        match kind {
            3 | 11 => {
                if let Some(path) = r.string()
                    && self.pending.len() < MAX_HANDLES
                {
                    let path = (!self.pending.contains_key(&id)).then_some(path);
                    self.pending.insert(id, path);
                }
            }
            4 => {
                if let Some(h) = r.bytes() {
                    self.open.remove(&h);
                }
            }
            _ => {}
        }
    }

    /// Notes an answer from the host: a `HANDLE` binds the open's path to it.
    pub fn answer(&mut self, packet: &[u8]) {
        let Some((kind, id, mut r)) = head(packet) else {
            return;
        };
        match kind {
            102 => {
                if let (Some(entry), Some(h)) = (self.pending.remove(&id), r.bytes()) {
                    // A handle string the host hands out again names the new file only.
                    self.open.remove(&h);
                    if let Some(path) = entry
                        && self.open.len() < MAX_HANDLES
                    {
                        self.open.insert(h, path);
                    }
                }
            }
            101 => {
                self.pending.remove(&id);
            }
            _ => {}
        }
    }

    /// The path `handle` was opened with, if it is known.
    pub fn path(&self, handle: &[u8]) -> Option<&str> {
        self.open.get(handle).map(String::as_str)
    }
}

/// A packet's type and request id, and a reader of the rest.
fn head(packet: &[u8]) -> Option<(u8, u32, Reader<'_>)> {
    let mut r = Reader(packet.get(4..)?);
    Some((r.u8()?, r.u32()?, r))
}

/// A `STATUS` answer to request `id`.
pub fn status(id: u32, code: u32, message: &str) -> Vec<u8> {
    let msg = message.as_bytes();
    let mut body = Vec::with_capacity(msg.len() + 24);
    body.push(101);
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(msg);
    body.extend_from_slice(&2u32.to_be_bytes());
    body.extend_from_slice(b"en");
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, id: u32, fields: &[&[u8]]) -> Vec<u8> {
        let mut body = vec![kind];
        body.extend_from_slice(&id.to_be_bytes());
        for f in fields {
            body.extend_from_slice(f);
        }
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    fn s(x: &str) -> Vec<u8> {
        let mut v = (x.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(x.as_bytes());
        v
    }

    #[test]
    fn packets_are_framed_across_chunks() {
        let p = packet(13, 7, &[&s("/tmp/x")]);
        let mut f = Framer::default();
        f.feed(&p[..5]);
        assert_eq!(f.packet(), Ok(None));
        f.feed(&p[5..]);
        assert_eq!(f.packet(), Ok(Some(bytes::Bytes::from(p.clone()))));
        f.feed(&[0xff, 0xff, 0xff, 0xff]);
        assert!(f.packet().is_err());
    }

    #[test]
    fn requests_are_described() {
        let open_read = packet(
            3,
            1,
            &[&s("/etc/hosts"), &1u32.to_be_bytes(), &0u32.to_be_bytes()],
        );
        let op = Op::parse(&open_read).unwrap_or_else(|| panic!("parsed"));
        assert_eq!(op.describe(), "sftp get /etc/hosts");
        assert!(op.reads && !op.writes);
        let open_write = packet(
            3,
            2,
            &[&s("/tmp/up"), &0x1au32.to_be_bytes(), &0u32.to_be_bytes()],
        );
        assert_eq!(
            Op::parse(&open_write).map(|o| o.describe()),
            Some("sftp put /tmp/up".into())
        );
        let rename = packet(18, 3, &[&s("/a"), &s("/b")]);
        assert_eq!(
            Op::parse(&rename).map(|o| o.describe()),
            Some("sftp rename /a /b".into())
        );
        // Relative paths are in the home directory; `..` stays for the host to resolve.
        let open_rel = packet(
            3,
            8,
            &[
                &s("./reports//a.txt"),
                &1u32.to_be_bytes(),
                &0u32.to_be_bytes(),
            ],
        );
        assert_eq!(
            Op::parse(&open_rel).map(|o| o.describe()),
            Some("sftp get ~/reports/a.txt".into())
        );
        let climbing = packet(
            3,
            9,
            &[
                &s("/srv/reports/./../../etc/shadow"),
                &1u32.to_be_bytes(),
                &0u32.to_be_bytes(),
            ],
        );
        assert_eq!(
            Op::parse(&climbing).map(|o| o.describe()),
            Some("sftp get /srv/reports/../../etc/shadow".into())
        );
        for (path, shown) in [
            ("", "~"),
            (".", "~"),
            ("/", "/"),
            ("//etc/", "/etc"),
            ("a/../b", "~/a/../b"),
        ] {
            assert_eq!(shown_path(path), shown, "{path:?}");
        }
        let read = packet(
            5,
            4,
            &[&s("handle"), &0u64.to_be_bytes(), &1024u32.to_be_bytes()],
        );
        assert_eq!(Op::parse(&read), None);
        let chmod_setuid = packet(
            9,
            6,
            &[&s("/tmp/x"), &4u32.to_be_bytes(), &0o4755u32.to_be_bytes()],
        );
        assert!(Op::parse(&chmod_setuid).is_some_and(|o| o.setid));
        let chmod_plain = packet(
            9,
            7,
            &[&s("/tmp/x"), &4u32.to_be_bytes(), &0o755u32.to_be_bytes()],
        );
        assert!(Op::parse(&chmod_plain).is_some_and(|o| !o.setid));
        let truncated = packet(13, 5, &[&[0, 0, 0, 9]]);
        assert_eq!(
            Op::parse(&truncated).map(|o| o.name),
            Some(MALFORMED.into())
        );
    }

    #[test]
    fn handles_name_the_files_they_were_opened_with() {
        let mut h = Handles::default();
        h.request(&packet(
            3,
            1,
            &[&s("/etc/shadow"), &1u32.to_be_bytes(), &0u32.to_be_bytes()],
        ));
        h.answer(&packet(102, 1, &[&s("h1")]));
        assert_eq!(h.path(b"h1"), Some("/etc/shadow"));
        let chown = packet(
            10,
            2,
            &[
                &s("h1"),
                &2u32.to_be_bytes(),
                &0u32.to_be_bytes(),
                &0u32.to_be_bytes(),
            ],
        );
        let op = Op::parse(&chown).unwrap_or_else(|| panic!("parsed"));
        assert!(op.chown && op.handle.as_deref() == Some(&b"h1"[..]));
        h.request(&packet(4, 3, &[&s("h1")]));
        assert_eq!(h.path(b"h1"), None);
        // A failed open binds nothing.
        h.request(&packet(
            3,
            4,
            &[&s("/nope"), &1u32.to_be_bytes(), &0u32.to_be_bytes()],
        ));
        h.answer(&packet(101, 4, &[&2u32.to_be_bytes()]));
        h.answer(&packet(102, 4, &[&s("h2")]));
        assert_eq!(h.path(b"h2"), None);
        // Two opens with one request id: neither handle is known.
        for path in ["/home/u/.ssh/authorized_keys", "/tmp/notes.txt"] {
            h.request(&packet(
                3,
                9,
                &[&s(path), &1u32.to_be_bytes(), &0u32.to_be_bytes()],
            ));
        }
        h.answer(&packet(102, 9, &[&s("h9")]));
        assert_eq!(h.path(b"h9"), None);
        let lsetstat = packet(
            200,
            5,
            &[
                &s("lsetstat@openssh.com"),
                &s("/tmp/x"),
                &4u32.to_be_bytes(),
                &0o4755u32.to_be_bytes(),
            ],
        );
        assert!(Op::parse(&lsetstat).is_some_and(|o| o.setid));
    }

    #[test]
    fn a_status_is_one_packet() {
        let st = status(9, PERMISSION_DENIED, "no");
        let mut f = Framer::default();
        f.feed(&st);
        assert_eq!(f.packet(), Ok(Some(bytes::Bytes::from(st.clone()))));
        assert_eq!(&st[4..9], &[101, 0, 0, 0, 9]);
    }
}
