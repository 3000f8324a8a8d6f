//! Programs that write files named in their arguments, options or input: copies and moves
//! (`cp`, `mv`, `install`, `rsync`, `scp`), links, `dd of=`, `sponge`, `truncate`, `touch`,
//! `patch`, `openssl … -out`, `gpg -o`, `uudecode`, decompressors, and archives extracted
//! by `pax`, `ar` and `cpio -p`. Every path written goes through the one check of
//! [`Walker::written`] (account, sudo, cron and login-startup files are `Privilege`,
//! devices `Admin`), and a place that takes files the check cannot name (a recursive copy's
//! tree, an archive's members) is `Privilege` where startup files live.

use agentgate_crds::OperationClass::{self, *};

use super::effects::{flag, operands, startup_place, values};
use super::{Walker, WordText, basename, join_dir, normalize_path, severity, write_class};

/// The more severe of two classes.
fn worst(a: OperationClass, b: OperationClass) -> OperationClass {
    if severity(b) > severity(a) { b } else { a }
}

/// `name` inside directory `dir` (`dir/name`, without doubling a `/`).
fn inside(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// The directory that holds `p` (relative paths in the login's home): `~/a` for `~/a/b`,
/// `~` for `b`, `/x` for `/x/y`.
fn parent(p: &str) -> String {
    let home = if p.starts_with('/') || p == "~" || p.starts_with("~/") {
        p.to_owned()
    } else {
        format!("~/{p}")
    };
    let trimmed = home.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", _)) => "/".to_owned(),
        Some((dir, _)) => dir.to_owned(),
        None if trimmed.is_empty() => "/".to_owned(),
        None => "~".to_owned(),
    }
}

/// Whether a link whose target is `target`, made at `link` (relative paths in the login's
/// home, where an sftp session starts), points at startup, account or system files: a
/// relative target is read from the link's own directory, as the kernel reads it.
pub(super) fn link_reaches_startup(target: &str, link: &str) -> bool {
    let mut places = Vec::new();
    if target.starts_with('/') {
        places.push(normalize_path(target));
    } else {
        // Climbing out of the home directory leads somewhere not known.
        match join_dir(&parent(link), target) {
            Some(p) => places.push(p),
            None => return true,
        }
        // `~` is no home directory to the kernel, but a client may have meant it as one.
        if let Some(rest) = target.strip_prefix('~') {
            places.push(join_dir("~", rest.trim_start_matches('/')).unwrap_or_default());
        }
    }
    places
        .iter()
        .any(|p| startup_place(p, false) || write_class(&normalize_path(p)) != Write)
}

/// The class of making a symbolic link at `link` to `target` (an SFTP `symlink`: paths as
/// sent, relative ones in the login's home): `Privilege` when the link points at startup,
/// account or system files or a place where they live (a later plain write through it,
/// `put x s/rc` after `symlink .ssh s`, would land there), or when the link itself is such a
/// file; `Write` otherwise.
pub fn symlink_class(target: &str, link: &str) -> OperationClass {
    let made = super::landing_class(&[link.to_owned()], false);
    if link_reaches_startup(target, link) {
        worst(made, Privilege)
    } else {
        made
    }
}

/// The class of making a hard link `link` to the existing file `existing` (relative paths in
/// the login's home): a write through the link changes that file, so a startup, account or
/// system file is `Privilege`.
pub fn hardlink_class(existing: &str, link: &str) -> OperationClass {
    let made = super::landing_class(&[link.to_owned()], false);
    let old = if existing.starts_with('/') {
        Some(normalize_path(existing))
    } else {
        join_dir("~", existing)
    };
    let reaches = old.is_none_or(|p| {
        p.starts_with('/') && !existing.starts_with('/')
            || startup_place(&p, false)
            || write_class(&p) != Write
    });
    if reaches {
        worst(made, Privilege)
    } else {
        made
    }
}

/// The class of renaming `from` to `to` (relative paths in the login's home): what lands at
/// `to`, and, since `from` may be a directory, every file in it: `Privilege` where startup
/// files live (`rename keys .ssh`).
pub fn rename_class(to: &str) -> OperationClass {
    let made = super::landing_class(&[to.to_owned()], false);
    let dest = if to.starts_with('/') {
        Some(normalize_path(to))
    } else {
        join_dir("~", to)
    };
    if dest.is_none_or(|d| d != "~" && d != "/" && startup_place(&d, true)) {
        worst(made, Privilege)
    } else {
        made
    }
}

/// How a copying program reads its arguments.
struct CopyArgs {
    /// Short options that take a value.
    short_values: &'static str,
    /// Long options that take a value.
    long_values: &'static [&'static str],
    /// `-t DIR` / `--target-directory` names the destination.
    target_option: bool,
    /// Copies directories with what they hold.
    recursive: bool,
    /// A source ending in `/` means its contents (rsync).
    trailing_slash_contents: bool,
}

/// Suffixes a decompressor strips to name what it writes.
const COMPRESSED: [(&str, &str); 14] = [
    (".tgz", ".tar"),
    (".taz", ".tar"),
    (".tbz2", ".tar"),
    (".tbz", ".tar"),
    (".txz", ".tar"),
    (".tzst", ".tar"),
    (".gz", ""),
    (".z", ""),
    (".bz2", ""),
    (".xz", ""),
    (".lzma", ""),
    (".zst", ""),
    (".lz4", ""),
    (".lz", ""),
];

impl Walker {
    fn written_path(&mut self, path: &str) {
        self.written(&WordText {
            text: path.to_owned(),
            ..Default::default()
        });
    }

    /// Whether the word `text` comes from an expansion or a glob (the name it stands for
    /// is known only on the host).
    fn unknown_name(words: &[WordText], text: &str) -> bool {
        // (`{}` is what `find -exec` and `xargs -I{}` put a found name in.)
        words
            .iter()
            .any(|w| w.text == text && (w.dynamic || w.pattern || w.text.contains("{}")))
    }

    /// Files named by something the check cannot read (an archive, a tree copied, a
    /// server) written into `dirs` (the shell's directory when empty): `Privilege` where
    /// startup or account files live.
    fn named_elsewhere_into(&mut self, dirs: &[&str], what: &str) -> bool {
        let hit = if dirs.is_empty() {
            self.extracts_into_startup_dirs(None)
        } else {
            dirs.iter()
                .any(|d| self.extracts_into_startup_dirs(Some(d)))
        };
        if hit {
            self.key(what);
            self.raise(Privilege);
        }
        hit
    }

    /// The class of programs that write files named in their arguments; `None` for the
    /// others.
    pub(super) fn writers(&mut self, name: &str, words: &[WordText]) -> Option<OperationClass> {
        let args: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
        let args = args.as_slice();
        let class = match name {
            "dd" => {
                // Every `of=` (the last wins, but each is checked); a device is `Admin`.
                let outs: Vec<&str> = args.iter().filter_map(|a| a.strip_prefix("of=")).collect();
                for o in &outs {
                    self.written_path(o);
                }
                let discarded = |p: &&str| {
                    let n = normalize_path(p);
                    matches!(n.as_str(), "/dev/null" | "/dev/stdout" | "/dev/stderr")
                        || n.starts_with("/dev/fd/")
                };
                if outs.iter().all(discarded) {
                    Read
                } else {
                    Write
                }
            }
            "sponge" => {
                for f in operands(args, "", &[]) {
                    self.written_path(f);
                }
                Write
            }
            "truncate" => {
                for f in operands(args, "sr", &["size", "reference"]) {
                    self.written_path(f);
                }
                Write
            }
            "touch" => {
                for f in operands(args, "drt", &["date", "reference", "time"]) {
                    self.written_path(f);
                }
                Write
            }
            "mkdir" => {
                for f in operands(args, "mZ", &["mode", "context"]) {
                    self.written_path(f);
                }
                Write
            }
            "cp" => self.copies(
                words,
                &CopyArgs {
                    short_values: "tS",
                    long_values: &["target-directory", "suffix", "sparse", "no-preserve"],
                    target_option: true,
                    recursive: flag(args, Some('r'), Some("recursive"), 3)
                        || flag(args, Some('R'), None, 0)
                        || flag(args, Some('a'), Some("archive"), 2),
                    trailing_slash_contents: false,
                },
            ),
            // A file moved may be a directory: what it holds lands too.
            "mv" => self.copies(
                words,
                &CopyArgs {
                    short_values: "tS",
                    long_values: &["target-directory", "suffix"],
                    target_option: true,
                    recursive: true,
                    trailing_slash_contents: false,
                },
            ),
            "install" => {
                if values(args, Some('m'), Some("mode"), 2)
                    .iter()
                    .any(|m| super::is_setid_mode(m))
                {
                    self.key("setuid");
                    self.raise(Privilege);
                }
                if flag(args, Some('o'), Some("owner"), 2)
                    || flag(args, Some('g'), Some("group"), 1)
                {
                    self.key("sets an owner");
                    self.raise(Privilege);
                }
                if flag(args, None, Some("strip-program"), 7) {
                    self.key("runs a program");
                    self.raise(Exec);
                }
                let short = "tSmogZ";
                let long: &[&str] = &[
                    "target-directory",
                    "suffix",
                    "mode",
                    "owner",
                    "group",
                    "strip-program",
                    "context",
                ];
                if flag(args, Some('d'), Some("directory"), 1) {
                    for d in operands(args, short, long) {
                        self.written_path(d);
                    }
                    Write
                } else {
                    self.copies(
                        words,
                        &CopyArgs {
                            short_values: short,
                            long_values: long,
                            target_option: true,
                            recursive: false,
                            trailing_slash_contents: false,
                        },
                    )
                }
            }
            // The sending side of `scp -t`/`-f` is not a copy on this host; a client run in a
            // shell line copies to or from another one, maybe into a local file.
            "scp" if !flag(args, Some('t'), None, 0) && !flag(args, Some('f'), None, 0) => {
                let class = self.copies(
                    words,
                    &CopyArgs {
                        short_values: "cDFiJlLoPSX",
                        long_values: &[],
                        target_option: false,
                        recursive: flag(args, Some('r'), None, 0),
                        trailing_slash_contents: false,
                    },
                );
                // A program of the agent's choosing (`-D sftp-server`, `-S ssh`), or a remote
                // shell command or config file (`-o ProxyCommand=…`, `-F`).
                if args.iter().any(|a| {
                    a.starts_with('-')
                        && !a.starts_with("--")
                        && a[1..].contains(['D', 'o', 'S', 'F'])
                }) {
                    self.key("runs a program");
                    self.raise(Exec);
                }
                class
            }
            "patch" => {
                // GNU patch runs `ed` for ed-style diffs.
                if flag(args, Some('e'), Some("ed"), 2) {
                    self.key("runs a program");
                    self.raise(Exec);
                }
                let mut out = values(args, Some('o'), Some("output"), 2);
                out.extend(values(args, Some('r'), Some("reject-file"), 3));
                for o in out {
                    if o != "-" {
                        self.written_path(o);
                    }
                }
                let dirs = values(args, Some('d'), Some("directory"), 3);
                let ops = operands(
                    args,
                    "BDdFgiopVrYz",
                    &[
                        "prefix",
                        "ifdef",
                        "directory",
                        "fuzz",
                        "get",
                        "input",
                        "output",
                        "strip",
                        "version-control",
                        "reject-file",
                        "basename-prefix",
                        "suffix",
                        "quoting-style",
                        "reject-format",
                        "read-only",
                    ],
                );
                match ops.first() {
                    // The file to patch, in the `-d` directory.
                    Some(f) => match dirs.last() {
                        Some(d) if !f.starts_with(['/', '~']) => self.written_path(&inside(d, f)),
                        _ => self.written_path(f),
                    },
                    // The files the patch names.
                    None => {
                        self.named_elsewhere_into(&dirs, "files named by the patch");
                    }
                }
                Write
            }
            "openssl" => self.openssl(args),
            "gpg" | "gpg2" => self.gpg(args),
            "uudecode" => {
                let out = values(args, Some('o'), Some("output-file"), 2);
                if out.is_empty() {
                    // The name comes from the input's `begin` line, and may be any path.
                    self.key("files named by the input");
                    self.raise(Privilege);
                    Write
                } else {
                    for o in out {
                        if o != "-" {
                            self.written_path(o);
                        }
                    }
                    Write
                }
            }
            "gzip" | "gunzip" | "pigz" | "unpigz" | "bzip2" | "bunzip2" | "pbzip2" | "xz"
            | "unxz" | "lzma" | "unlzma" | "zstd" | "unzstd" | "lz4" | "unlz4" | "lzip"
            | "lunzip" => self.decompressor(name, args),
            // Archives whose members name what is written.
            "pax" if flag(args, Some('r'), None, 0) => {
                let dirs: Vec<&str> = Vec::new();
                self.named_elsewhere_into(&dirs, "files named by the archive");
                Write
            }
            "ar" if args.first().is_some_and(|a| {
                a.trim_start_matches('-').starts_with('x')
                    || (!a.starts_with('-') && a.contains('x'))
            }) =>
            {
                let dirs: Vec<&str> = values(args, None, Some("output"), 6);
                self.named_elsewhere_into(&dirs, "files named by the archive");
                Write
            }
            "cpio" if flag(args, Some('p'), Some("pass-through"), 3) => {
                let ops = operands(
                    args,
                    "CDEFHIMORs",
                    &["directory", "format", "file", "owner", "pattern-file"],
                );
                let dirs: Vec<&str> = ops.last().copied().into_iter().collect();
                self.named_elsewhere_into(&dirs, "files named by the input");
                Write
            }
            _ => return None,
        };
        Some(class)
    }

    /// `cp`, `mv`, `install`, `rsync`, `scp`: each file lands at the destination, or inside
    /// it under its own name; a tree copied (or moved) lands with names the check cannot see.
    fn copies(&mut self, words: &[WordText], how: &CopyArgs) -> OperationClass {
        let args: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
        let args = args.as_slice();
        let ops = operands(args, how.short_values, how.long_values);
        let target_dir = if how.target_option {
            values(args, Some('t'), Some("target-directory"), 3)
                .last()
                .copied()
        } else {
            None
        };
        let no_target_dir =
            how.target_option && flag(args, Some('T'), Some("no-target-directory"), 4);
        let (sources, dest): (&[&str], &str) = match target_dir {
            Some(d) => (&ops[..], d),
            None => match ops.split_last() {
                Some((d, s)) if !s.is_empty() => (s, *d),
                _ => return Write,
            },
        };
        // What lands where: each file at `dest` itself (it names a file, or is made by a
        // tree copied), or inside `dest` under the source's name.
        let mut files: Vec<String> = Vec::new();
        let mut trees: Vec<String> = Vec::new();
        let mut unnamed = false;
        for src in sources {
            let contents = basename(src) == "."
                || (how.trailing_slash_contents && src.len() > 1 && src.ends_with('/'));
            if no_target_dir || contents {
                // What the source holds lands in `dest` under its own names.
                files.push(dest.to_owned());
                unnamed = true;
                continue;
            }
            if Self::unknown_name(words, src) {
                unnamed = true;
            } else {
                files.push(inside(dest, basename(src)));
                trees.push(inside(dest, basename(src)));
            }
            if target_dir.is_none() {
                files.push(dest.to_owned());
                trees.push(dest.to_owned());
            }
        }
        files.dedup();
        for f in &files {
            self.written_path(f);
        }
        // A backup of what is replaced lands beside it, under its name and a suffix
        // (`cp -b -S rc x .bash` writes `.bashrc`).
        let suffixes = values(args, Some('S'), Some("suffix"), 2);
        if flag(args, Some('b'), Some("backup"), 3) || !suffixes.is_empty() {
            let suffix = suffixes.last().copied().unwrap_or("~");
            for f in &files {
                self.written_path(&format!("{f}{suffix}"));
            }
        }
        // Links made instead of copies (`cp -s`, `cp -l`) lead where their sources are: a
        // later write through one changes that file.
        if how.target_option
            && (flag(args, Some('s'), Some("symbolic-link"), 3)
                || flag(args, Some('l'), Some("link"), 4))
        {
            for src in sources {
                if Self::unknown_name(words, src) || link_reaches_startup(src, dest) {
                    self.key("a link to startup or account files");
                    self.raise(Privilege);
                }
            }
        }
        if unnamed || how.recursive {
            // A tree lands with the names it holds; one copied into a place that always
            // exists (the home directory, `/`) lands inside it, under its own name.
            let always_there = |d: &str| {
                let n = if d.starts_with('/') {
                    normalize_path(d)
                } else {
                    join_dir("~", d.trim_start_matches('~').trim_start_matches('/'))
                        .unwrap_or_default()
                };
                n == "~" || n == "/" || d == "." || d == "./"
            };
            let mut places: Vec<&str> = Vec::new();
            if unnamed {
                places.push(dest);
            }
            if how.recursive {
                places.extend(
                    trees
                        .iter()
                        .map(String::as_str)
                        .filter(|t| *t != dest || !always_there(t)),
                );
            }
            places.dedup();
            if !places.is_empty() {
                self.named_elsewhere_into(&places, "files named by the source");
            }
        }
        Write
    }

    /// rsync: what it writes locally (the destination, its log and batch files), and the
    /// options that run programs or set owners and modes.
    pub(super) fn rsync(&mut self, words: &[WordText]) -> OperationClass {
        let args: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
        let args = args.as_slice();
        let mut class = Write;
        if args.iter().any(|a| {
            a.starts_with("--rsh")
                || a.starts_with("--rsync-path")
                || a.starts_with("--daemon")
                || a.starts_with("--config")
                || a.starts_with("--early-input")
                // `-e cmd`, `-e'cmd'`, or `e` in a cluster (`-ave cmd`); not the receiving
                // side's `--server -vlogDtpre.iLsfxCIvu`, whose `e.` is protocol
                // capabilities.
                || (!args.contains(&"--server")
                    && a.starts_with('-')
                    && !a.starts_with("--")
                    && a[1..].contains('e'))
        }) {
            self.key("runs a program");
            class = Exec;
        }
        if flag(args, None, Some("chown"), 4)
            || flag(args, None, Some("usermap"), 3)
            || flag(args, None, Some("groupmap"), 3)
            || values(args, None, Some("chmod"), 4)
                .iter()
                .any(|m| super::is_setid_mode(m) || m.contains('s'))
        {
            self.key("sets an owner or mode");
            class = worst(class, Privilege);
        }
        let mut logs = values(args, None, Some("log-file"), 5);
        logs.extend(values(args, None, Some("write-batch"), 3));
        logs.extend(values(args, None, Some("only-write-batch"), 3));
        for f in logs {
            self.written_path(f);
        }
        // Backups of what is replaced, under their own names.
        let backups = values(args, None, Some("backup-dir"), 8);
        if !backups.is_empty() && self.named_elsewhere_into(&backups, "files named by the source") {
            class = worst(class, Privilege);
        }
        if args.contains(&"--server") {
            // The receiving side of an upload: the sender names the files.
            if !args.contains(&"--sender") {
                let dest = operands(args, "", &[]).last().copied().unwrap_or(".");
                if self.extracts_into_startup_dirs(Some(dest)) {
                    self.key("files named by the sender");
                    class = worst(class, Privilege);
                }
            }
            return class;
        }
        let copied = self.copies(
            words,
            &CopyArgs {
                short_values: "eBfMT@",
                long_values: &[
                    "rsh",
                    "rsync-path",
                    "filter",
                    "exclude",
                    "exclude-from",
                    "include",
                    "include-from",
                    "files-from",
                    "temp-dir",
                    "partial-dir",
                    "backup-dir",
                    "compare-dest",
                    "copy-dest",
                    "link-dest",
                    "chmod",
                    "chown",
                    "usermap",
                    "groupmap",
                    "timeout",
                    "contimeout",
                    "port",
                    "bwlimit",
                    "max-size",
                    "min-size",
                    "modify-window",
                    "suffix",
                    "out-format",
                    "log-file",
                    "log-file-format",
                    "password-file",
                    "protocol",
                    "iconv",
                    "checksum-choice",
                    "compress-choice",
                    "compress-level",
                    "skip-compress",
                    "max-delete",
                    "block-size",
                    "info",
                    "debug",
                    "stderr",
                    "outbuf",
                    "address",
                    "sockopts",
                    "remote-option",
                    "write-batch",
                    "only-write-batch",
                    "read-batch",
                    "early-input",
                    "config",
                    "dparam",
                    "stop-after",
                    "stop-at",
                ],
                target_option: false,
                recursive: flag(args, Some('r'), Some("recursive"), 3)
                    || flag(args, Some('a'), Some("archive"), 2)
                    || flag(args, Some('d'), Some("dirs"), 3),
                trailing_slash_contents: true,
            },
        );
        worst(class, copied)
    }

    /// openssl: the files its options write, and the options that load code.
    fn openssl(&mut self, args: &[&str]) -> OperationClass {
        const WRITES: [&str; 13] = [
            "out",
            "keyout",
            "certout",
            "reqout",
            "respout",
            "crlout",
            "pubout_file",
            "writerand",
            "sess_out",
            "keylogfile",
            "msgfile",
            "CAserial",
            "signature_out",
        ];
        // An engine or provider is a shared library it loads; a config file may name one.
        const LOADS: [&str; 4] = ["engine", "provider", "provider-path", "config"];
        let mut class = Read;
        let mut i = 0;
        while i < args.len() {
            let a = args[i];
            i += 1;
            let Some(opt) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
                continue;
            };
            let (opt, attached) = match opt.split_once('=') {
                Some((o, v)) => (o, Some(v)),
                None => (opt, None),
            };
            let takes = WRITES.contains(&opt) || LOADS.contains(&opt) || opt == "outdir";
            let value = match attached {
                Some(v) => Some(v),
                None if takes => {
                    let v = args.get(i).copied();
                    i += 1;
                    v
                }
                None => None,
            };
            let Some(value) = value else { continue };
            if WRITES.contains(&opt) {
                if value != "-" {
                    self.written_path(value);
                }
                class = worst(class, Write);
            } else if opt == "outdir" {
                // Certificates named by serial number.
                class = worst(class, Write);
            } else if LOADS.contains(&opt) {
                self.key("loads code");
                class = worst(class, Exec);
            }
        }
        class
    }

    /// gpg: the files it writes (`-o`, next to what it decrypts, or a name the message
    /// carries), and the options that run programs.
    fn gpg(&mut self, args: &[&str]) -> OperationClass {
        let mut class = Read;
        for (long, min) in [
            ("exec-path", 4),
            ("photo-viewer", 3),
            ("agent-program", 3),
            ("dirmngr-program", 3),
            ("keyboxd-program", 3),
            ("load-extension", 3),
            ("options", 4),
            ("homedir", 4),
        ] {
            if flag(args, None, Some(long), min) {
                self.key("runs a program");
                class = Exec;
            }
        }
        let outputs = values(args, Some('o'), Some("output"), 4);
        for o in &outputs {
            if *o != "-" {
                self.written_path(o);
            }
            class = worst(class, Write);
        }
        if flag(args, None, Some("use-embedded-filename"), 5) {
            self.key("files named by the input");
            class = worst(class, Privilege);
        }
        let decrypts_files = flag(args, None, Some("decrypt-files"), 10);
        let commands = args.iter().any(|a| {
            a.starts_with("--")
                && !a.starts_with("--output")
                && ![
                    "--batch",
                    "--yes",
                    "--quiet",
                    "--no-tty",
                    "--verbose",
                    "--pinentry-mode",
                    "--passphrase",
                    "--passphrase-fd",
                    "--passphrase-file",
                    "--no-default-keyring",
                    "--keyring",
                    "--armor",
                ]
                .contains(&a.split('=').next().unwrap_or(a))
        }) || args.iter().any(|a| {
            a.starts_with('-')
                && !a.starts_with("--")
                && a[1..].contains(|c: char| c != 'v' && c != 'q' && c != 'o')
        });
        if outputs.is_empty() && (decrypts_files || !commands) {
            // Decrypting FILE.gpg writes FILE next to it.
            for f in operands(
                args,
                "orsuk",
                &["output", "recipient", "local-user", "default-key"],
            ) {
                for suffix in [".gpg", ".pgp", ".asc", ".sig"] {
                    if let Some(plain) = f.strip_suffix(suffix)
                        && !plain.is_empty()
                    {
                        self.written_path(plain);
                        class = worst(class, Write);
                    }
                }
            }
        }
        class
    }

    /// gzip and its kin: decompressing `FILE.gz` writes `FILE`; `-o` names the output.
    fn decompressor(&mut self, name: &str, args: &[&str]) -> OperationClass {
        let mut class = Read;
        let mut outs = values(args, Some('o'), Some("output"), 3);
        if matches!(name, "lz4" | "unlz4") {
            // `lz4 -d in out`.
            let ops = operands(args, "B", &[]);
            if ops.len() == 2 {
                outs.push(ops[1]);
            }
        }
        for o in &outs {
            if *o != "-" {
                self.written_path(o);
                class = Write;
            }
        }
        let to_stdout = flag(args, Some('c'), Some("stdout"), 3)
            || flag(args, None, Some("to-stdout"), 4)
            || flag(args, Some('t'), Some("test"), 2)
            || flag(args, Some('l'), Some("list"), 2);
        let decompress = matches!(
            name,
            "gunzip" | "unpigz" | "bunzip2" | "unxz" | "unlzma" | "unzstd" | "unlz4" | "lunzip"
        ) || flag(args, Some('d'), Some("decompress"), 3)
            || flag(args, None, Some("uncompress"), 3);
        if !decompress {
            // Compressing writes `FILE.gz`: never a startup file's name.
            return if to_stdout && outs.is_empty() {
                Read
            } else {
                Write
            };
        }
        if to_stdout || !outs.is_empty() {
            return class;
        }
        let ops = operands(
            args,
            "SbBpTLM",
            &["suffix", "memlimit", "threads", "format"],
        );
        // `-N`: the name stored in the file, in the file's own directory.
        if flag(args, Some('N'), Some("name"), 2) {
            let dirs: Vec<String> = ops.iter().map(|f| parent(f)).collect();
            let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
            self.named_elsewhere_into(&dirs, "files named by the input");
        }
        let custom = values(args, Some('S'), Some("suffix"), 3);
        for f in ops {
            let lower = f.to_ascii_lowercase();
            let stripped = custom
                .iter()
                .find_map(|s| f.strip_suffix(s).map(str::to_owned))
                .or_else(|| {
                    COMPRESSED.iter().find_map(|(suffix, repl)| {
                        lower
                            .ends_with(suffix)
                            .then(|| format!("{}{repl}", &f[..f.len() - suffix.len()]))
                    })
                });
            if let Some(out) = stripped.filter(|o| !o.is_empty() && !o.ends_with('/')) {
                self.written_path(&out);
                class = Write;
            }
        }
        worst(class, Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_renames_are_judged_by_where_they_lead() {
        for (target, link, want) in [
            (".ssh", "s", Privilege),
            ("/etc", "/tmp/e", Privilege),
            ("/etc/sudoers.d", "/tmp/e", Privilege),
            ("../.ssh", "sub/k", Privilege),
            ("../../../etc", "/srv/app/x/e", Privilege),
            (".bashrc", "notes", Privilege),
            ("/root", "/tmp/r", Privilege),
            ("/srv/app/current", "app", Write),
            ("releases/v2", "/srv/app/current", Write),
            ("notes.txt", "n", Write),
            ("/tmp/x", ".bashrc", Privilege),
        ] {
            assert_eq!(symlink_class(target, link), want, "{target} <- {link}");
        }
        assert_eq!(hardlink_class("/etc/sudoers", "/tmp/s"), Privilege);
        assert_eq!(hardlink_class(".ssh/authorized_keys", "k"), Privilege);
        assert_eq!(hardlink_class("../../etc/passwd", "p"), Privilege);
        assert_eq!(hardlink_class("/srv/app/a", "/srv/app/b"), Write);
        assert_eq!(rename_class(".ssh"), Privilege);
        assert_eq!(rename_class("/etc/cron.d/job"), Privilege);
        assert_eq!(rename_class("/srv/app/b"), Write);
        assert_eq!(rename_class("notes2.txt"), Write);
        assert_eq!(parent("a"), "~");
        assert_eq!(parent("a/b/"), "~/a");
        assert_eq!(parent("/x"), "/");
        assert_eq!(parent("/x/y"), "/x");
        assert_eq!(parent("~/a"), "~");
    }
}
