//! What programs do through their options: the files they write (`sort -o`, `wget -O`,
//! `curl -o`, `uniq in out`, `history -w`), the programs they run (`sort
//! --compress-program`, `rg --pre`, `wget --use-askpass`, aria2c hooks, `tar -I`, sed's `e`),
//! and the host settings they change (`date -s`, `hostname NAME`, `timedatectl set-…`).
//! Options are read as GNU getopt reads them: values attached or separate, short options in
//! clusters, long options abbreviated.

use agentgate_crds::OperationClass::{self, *};

use super::{Walker, WordText, basename, sed};

/// The values of option `-c` (`short`) or `--long` (`long`, or an abbreviation of it of at
/// least `min` letters): `-c V`, `-cV`, in a cluster (`-xc V`, `-xcV`), `--long=V`,
/// `--long V`. Options end at `--`.
pub fn values<'a>(
    args: &[&'a str],
    short: Option<char>,
    long: Option<&str>,
    min: usize,
) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        i += 1;
        if a == "--" {
            break;
        }
        if let Some(name) = a.strip_prefix("--") {
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (name, None),
            };
            if long.is_some_and(|l| name.len() >= min.min(l.len()) && l.starts_with(name)) {
                match value {
                    Some(v) => out.push(v),
                    None => {
                        if let Some(v) = args.get(i) {
                            out.push(*v);
                            i += 1;
                        }
                    }
                }
            }
        } else if let (Some(c), Some(flags)) = (short, a.strip_prefix('-'))
            && let Some(at) = flags.find(c)
        {
            let rest = &flags[at + c.len_utf8()..];
            if rest.is_empty() {
                if let Some(v) = args.get(i) {
                    out.push(*v);
                    i += 1;
                }
            } else {
                out.push(rest);
            }
        }
    }
    out
}

/// Whether option `-c` or `--long` (abbreviated to at least `min` letters) is given.
pub fn flag(args: &[&str], short: Option<char>, long: Option<&str>, min: usize) -> bool {
    args.iter().take_while(|a| **a != "--").any(|a| {
        if let Some(name) = a.strip_prefix("--") {
            let name = name.split_once('=').map_or(name, |(n, _)| n);
            long.is_some_and(|l| name.len() >= min.min(l.len()) && l.starts_with(name))
        } else {
            short.is_some_and(|c| a.starts_with('-') && a.len() > 1 && a[1..].contains(c))
        }
    })
}

/// The operands (non-options) of `args`, skipping the values of short options in
/// `short_values` and of long options in `long_values` (given without `=`).
pub fn operands<'a>(args: &[&'a str], short_values: &str, long_values: &[&str]) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut options = true;
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        i += 1;
        if !options || !a.starts_with('-') || a == "-" {
            out.push(a);
        } else if a == "--" {
            options = false;
        } else if let Some(name) = a.strip_prefix("--") {
            if !name.contains('=') && long_values.iter().any(|l| l.starts_with(name)) {
                i += 1;
            }
        } else if let Some(last) = a[1..].chars().position(|c| short_values.contains(c)) {
            // A value-taking option in a cluster takes the rest, or the next word.
            if last + 2 == a.chars().count() {
                i += 1;
            }
        }
    }
    out
}

/// Whether files of any name written into `dest` (relative: in the login's home) may be
/// startup, account or system files: the home directory itself, a hidden directory in it
/// (`.ssh`, `.config`), `/`, `/root`, `/etc`, a user's home under `/home`, and the program
/// directories.
fn receives_startup_files(dest: &str) -> bool {
    startup_place(dest, true)
}

/// [`receives_startup_files`]; `programs`: also the program directories (`/usr/bin`), where
/// a file written is a program in everyone's `PATH` (a link to one is harmless).
pub(super) fn startup_place(dest: &str, programs: bool) -> bool {
    let resolved = if dest.starts_with('/') {
        Some(super::normalize_path(dest))
    } else {
        let rel = dest
            .strip_prefix('~')
            .map_or(dest, |r| r.trim_start_matches('/'));
        // Above the home directory: another user's home, or `/`.
        match super::join_dir("~", rel) {
            Some(j) if j.starts_with('/') => return true,
            j => j,
        }
    };
    let Some(d) = resolved else {
        return true;
    };
    let d = d.trim_end_matches('/');
    let parts: Vec<&str> = d.split('/').filter(|p| !p.is_empty()).collect();
    d.is_empty()
        || d == "~"
        || d.starts_with("~/.")
        || (parts.first() == Some(&"home") && parts.get(2).is_some_and(|p| p.starts_with('.')))
        || matches!(parts.first(), Some(&("etc" | "root")))
        || (programs
            && (matches!(
                parts.first(),
                Some(&("bin" | "sbin" | "boot" | "lib" | "lib64"))
            ) || (parts.first() == Some(&"usr") && parts.len() <= 3)))
        || (parts.first() == Some(&"home") && parts.len() <= 2)
        || (parts.first() == Some(&"var") && parts.get(1) == Some(&"spool"))
        || super::write_class(d) != Write
}

/// `name` in `dir` (the current directory when `None`).
fn in_dir(dir: Option<&str>, name: &str) -> String {
    match dir {
        Some(d) => format!("{}/{name}", d.trim_end_matches('/')),
        None => name.to_owned(),
    }
}

/// xxd's operands: it reads one option per word by its first two characters (`-ps` is
/// `-p`); `-c`, `-g`, `-l`, `-o`, `-s`, `-n`, `-R` take a value attached (`-c8`) or, when
/// bare or spelled long (`-cols`), the next word.
fn xxd_operands<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        i += 1;
        if a == "--" {
            out.extend_from_slice(&args[i..]);
            break;
        }
        let mut chars = a.chars();
        match (chars.next(), chars.next()) {
            (Some('-'), Some(o)) if "cglosnR".contains(o) => {
                // `-c8` carries its value; `-c` and `-cols` take the next word; any other
                // spelling (`-capitalize`) is a flag of its own.
                let long = match o {
                    'c' => "ols",
                    'g' => "roupsize",
                    'l' => "en",
                    'o' => "ffset",
                    's' => "eek",
                    'n' => "ame",
                    _ => "olor",
                };
                let rest = chars.as_str();
                if rest.is_empty() || long.starts_with(rest) {
                    i += 1;
                }
            }
            (Some('-'), Some(_)) => {}
            _ => out.push(a),
        }
    }
    out
}

/// The last path segment of a URL (what a downloader names the file it saves).
fn url_file(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.split(['?', '#']).next().unwrap_or(rest);
    let (_, path) = path.split_once('/')?;
    let name = basename(path);
    (!name.is_empty()).then_some(name)
}

impl Walker {
    fn written_text(&mut self, path: &str) {
        self.written(&WordText {
            text: path.to_owned(),
            ..Default::default()
        });
    }

    /// The class of a program whose options write files, run programs or change the host;
    /// `None` for programs this does not cover (the caller's table decides).
    pub(super) fn side_effects(
        &mut self,
        name: &str,
        words: &[WordText],
    ) -> Option<OperationClass> {
        let args: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
        let args = args.as_slice();
        let class = match name {
            "sed" => {
                let e = sed::invocation(words);
                for f in e.writes.iter().chain(&e.in_place) {
                    self.written_text(f);
                }
                if e.runs {
                    self.key("sed runs commands");
                    Exec
                } else if e.writes.is_empty() && e.in_place.is_empty() {
                    Read
                } else {
                    Write
                }
            }
            "sort" => {
                if flag(args, None, Some("compress-program"), 2) {
                    self.key("runs a program");
                    return Some(Exec);
                }
                self.writes_to(&values(args, Some('o'), Some("output"), 1))
            }
            "uniq" => {
                let ops = operands(args, "fsw", &["skip-fields", "skip-chars", "check-chars"]);
                self.writes_to(ops.get(1..).unwrap_or(&[]))
            }
            "xxd" => {
                let ops = xxd_operands(args);
                self.writes_to(ops.get(1..).unwrap_or(&[]))
            }
            "iconv" => self.writes_to(&values(args, Some('o'), Some("output"), 1)),
            "tree" => self.writes_to(&values(args, Some('o'), None, 0)),
            "info" => {
                let mut out = values(args, Some('o'), Some("output"), 1);
                out.extend(values(args, None, Some("dribble"), 1));
                self.writes_to(&out)
            }
            "sar" => self.writes_to(&values(args, Some('o'), None, 0)),
            "yq" if flag(args, Some('i'), Some("inplace"), 3) => {
                let ops = operands(args, "o", &["output-format", "expression"]);
                self.writes_to(ops.get(1..).unwrap_or(&[]))
            }
            "history" => {
                // `history -w FILE` writes the history there (`~/.bashrc` is a startup file).
                if args
                    .iter()
                    .any(|a| a.starts_with('-') && a.contains(['w', 'a']))
                {
                    let ops = operands(args, "", &[]);
                    let file = ops.first().copied().unwrap_or("~/.bash_history");
                    self.written_text(file);
                }
                // Otherwise `RUNS_CODE` decides (history can run what it holds).
                return None;
            }
            // A link to a directory where startup or account files live lets a later plain
            // write land there (`ln -s /etc e; echo … > e/sudoers.d/x`).
            "ln" => {
                let ops = operands(args, "tS", &["target-directory", "suffix"]);
                let target_dir = values(args, Some('t'), Some("target-directory"), 3)
                    .last()
                    .copied();
                let no_target_dir = flag(args, Some('T'), Some("no-target-directory"), 4);
                let symbolic = flag(args, Some('s'), Some("symbolic"), 2);
                let (targets, dest): (&[&str], Option<&str>) = match (target_dir, ops.len()) {
                    (Some(d), _) => (&ops[..], Some(d)),
                    (None, 0) => return None,
                    (None, 1) => (&ops[..], None),
                    (None, n) => (&ops[..n - 1], Some(ops[n - 1])),
                };
                // Where each link is made: the destination itself, or inside it under the
                // target's name (in the shell's directory without a destination).
                let mut links: Vec<(&str, String)> = Vec::new();
                for t in targets {
                    match dest {
                        None => links.push((t, basename(t).to_owned())),
                        Some(d) if no_target_dir => links.push((t, d.to_owned())),
                        Some(d) => {
                            if target_dir.is_none() {
                                links.push((t, d.to_owned()));
                            }
                            links.push((t, format!("{}/{}", d.trim_end_matches('/'), basename(t))));
                        }
                    }
                }
                // A relative target is read from the shell's directory (a hard link) or from
                // the link's own directory (a symbolic one); both are checked.
                let links_to_startup = links.iter().any(|(t, link)| {
                    let places: Vec<String> = if t.starts_with(['/', '~']) {
                        vec![(*t).to_owned()]
                    } else {
                        self.cwds
                            .iter()
                            .flatten()
                            .filter_map(|c| super::join_dir(c, t))
                            .collect()
                    };
                    let in_startup = places.iter().any(|p| {
                        startup_place(p, false)
                            || (p.starts_with(['/', '~'])
                                && super::write_class(&super::normalize_path(p)) != Write)
                    });
                    in_startup
                        || (symbolic
                            && self.cwds.iter().flatten().any(|c| {
                                let at = if link.starts_with(['/', '~']) {
                                    Some(link.clone())
                                } else {
                                    super::join_dir(c, link)
                                };
                                at.is_none_or(|at| super::writers::link_reaches_startup(t, &at))
                            }))
                });
                let mut class = Write;
                for (_, link) in &links {
                    let c = self.write_class_of(link);
                    if super::severity(c) > super::severity(class) {
                        class = c;
                    }
                }
                if !links_to_startup {
                    // Only the link itself is written.
                    return Some(class);
                }
                self.key("a link to startup or account files");
                Privilege
            }
            // The receiving side of a legacy scp upload.
            "scp"
                if args
                    .iter()
                    .take_while(|a| **a != "--")
                    .any(|a| a.starts_with('-') && !a.starts_with("--") && a.contains('t')) =>
            {
                if flag(args, Some('o'), None, 0)
                    || flag(args, Some('S'), None, 0)
                    || flag(args, Some('F'), None, 0)
                {
                    return None;
                }
                self.key(super::SCP_UNCHECKED);
                Privilege
            }
            // bash's autocd and cdable_vars move the shell without a `cd` the check sees.
            "shopt" if args.iter().any(|a| matches!(*a, "autocd" | "cdable_vars")) => {
                self.key("runs code");
                Exec
            }
            // zsh's `print -z` types into the next command line, `-s` into the history.
            "print" if flag(args, Some('z'), None, 0) || flag(args, Some('s'), None, 0) => {
                self.key("runs code");
                Exec
            }
            // What rsync writes here: the receiving side of an upload (the sender names the
            // files, so a directory where startup or account files live takes any of them),
            // or a copy's destination; and the options that run programs.
            "rsync" => self.rsync(words),
            // Extracting an archive writes the names it holds: into the home directory (or
            // another place startup files live), any of them may be one.
            "tar" | "gtar" | "bsdtar"
                if flag(args, Some('x'), Some("extract"), 3)
                    || flag(args, None, Some("get"), 3)
                    || args
                        .first()
                        .is_some_and(|a| !a.starts_with('-') && a.contains('x')) =>
            {
                // Every `-C` counts (each applies to the members after it); one in an old-style
                // cluster (`tar xfC a.tar DIR`) is not followed.
                let dirs = values(args, Some('C'), Some("directory"), 3);
                let old_style_dir = args
                    .first()
                    .is_some_and(|a| !a.starts_with('-') && a.contains('C'));
                if !flag(args, Some('P'), Some("absolute-names"), 3)
                    && !old_style_dir
                    && !self.extracts_into_any(&dirs)
                {
                    return None;
                }
                self.key("files named by the archive");
                Privilege
            }
            "unzip"
                if !args.iter().any(|a| {
                    a.starts_with('-') && a[1..].contains(['l', 't', 'v', 'p', 'c', 'Z', 'z'])
                }) =>
            {
                let dirs = values(args, Some('d'), None, 0);
                if !self.extracts_into_any(&dirs) {
                    return None;
                }
                self.key("files named by the archive");
                Privilege
            }
            "cpio" if flag(args, Some('i'), Some("extract"), 3) => {
                let dirs = values(args, Some('D'), Some("directory"), 3);
                if flag(args, None, Some("no-absolute-filenames"), 4)
                    && !self.extracts_into_startup_dirs(dirs.last().copied())
                {
                    return None;
                }
                self.key("files named by the archive");
                Privilege
            }
            "7z" | "7za" | "7zr"
                if matches!(operands(args, "", &[]).first(), Some(&("x" | "e"))) =>
            {
                let dir = args
                    .iter()
                    .rev()
                    .find_map(|a| a.strip_prefix("-o"))
                    .filter(|d| !d.is_empty());
                if !self.extracts_into_startup_dirs(dir) {
                    return None;
                }
                self.key("files named by the archive");
                Privilege
            }
            "rg" if flag(args, None, Some("pre"), 3) => {
                self.key("runs a program");
                Exec
            }
            "date" => {
                let ops = operands(args, "dfr", &["date", "file", "reference"]);
                if flag(args, Some('s'), Some("set"), 1) || ops.iter().any(|o| !o.starts_with('+'))
                {
                    self.key("changes the clock");
                    Admin
                } else {
                    Read
                }
            }
            "hostname" => {
                let ops = operands(args, "F", &["file"]);
                if !ops.is_empty()
                    || flag(args, Some('F'), Some("file"), 2)
                    || flag(args, Some('b'), Some("boot"), 2)
                {
                    self.key("changes the host name");
                    Admin
                } else {
                    Read
                }
            }
            "timedatectl" | "hostnamectl" | "localectl" => {
                let ops = operands(args, "HM", &["host", "machine"]);
                let sub = ops.first().copied().unwrap_or("");
                if sub.starts_with("set-")
                    || (name == "hostnamectl"
                        && matches!(
                            sub,
                            "hostname" | "icon-name" | "chassis" | "deployment" | "location"
                        )
                        && ops.len() > 1)
                {
                    self.key("changes the host's settings");
                    Admin
                } else {
                    Read
                }
            }
            "loginctl" => {
                let ops = operands(
                    args,
                    "HMpnos",
                    &[
                        "host",
                        "machine",
                        "property",
                        "lines",
                        "output",
                        "signal",
                        "kill-whom",
                    ],
                );
                let sub = ops.first().copied().unwrap_or("");
                if sub.is_empty()
                    || sub.starts_with("list-")
                    || sub.starts_with("show-")
                    || sub.ends_with("-status")
                {
                    Read
                } else {
                    self.key("ends or changes sessions");
                    Admin
                }
            }
            "dmesg"
                if flag(args, Some('c'), Some("read-clear"), 6)
                    || flag(args, Some('C'), Some("clear"), 3)
                    || flag(args, Some('n'), Some("console-level"), 9)
                    || flag(args, Some('D'), Some("console-off"), 9)
                    || flag(args, Some('E'), Some("console-on"), 9) =>
            {
                self.key("changes the kernel log");
                Admin
            }
            "ss" if flag(args, Some('K'), Some("kill"), 3) => {
                self.key("kills connections");
                Admin
            }
            "top" | "htop" | "atop" | "btop" if !flag(args, Some('b'), Some("batch"), 3) => {
                // Interactive: a key kills or renices a process.
                Write
            }
            "curl" => self.curl(words, args),
            "wget" => self.wget(args),
            "aria2c" => {
                if args
                    .iter()
                    .any(|a| a.starts_with("--on-") || a.starts_with("--conf-path"))
                {
                    self.key("runs a program");
                    return Some(Exec);
                }
                // It follows .torrent and .metalink downloads and Content-Disposition: the
                // server names what it writes.
                let dir = values(args, Some('d'), Some("dir"), 3).last().copied();
                if self.extracts_into_startup_dirs(dir) {
                    self.key("files named by the server");
                    return Some(Privilege);
                }
                let dir = values(args, Some('d'), Some("dir"), 3).last().copied();
                let names = values(args, Some('o'), Some("out"), 3);
                if names.is_empty() {
                    self.downloaded_names(args, false, dir);
                } else {
                    for n in names {
                        self.written_text(&in_dir(dir, n));
                    }
                }
                Write
            }
            "fetch" => {
                let out = values(args, Some('o'), Some("output"), 3);
                self.writes_to(&out);
                if out.is_empty() {
                    self.downloaded_names(args, false, None);
                }
                Write
            }
            _ => return self.writers(name, words),
        };
        Some(class)
    }

    /// Whether an archive extracted into `dir` (the shell's directory when `None`) may write
    /// startup or account files: `dir`, or any place the shell may be, is such a place.
    pub(super) fn extracts_into_startup_dirs(&self, dir: Option<&str>) -> bool {
        match dir {
            Some(d) if d.starts_with(['/', '~']) => receives_startup_files(d),
            Some(d) => self.cwds.iter().any(|c| {
                c.as_ref()
                    .and_then(|c| super::join_dir(c, d))
                    .is_none_or(|p| receives_startup_files(&p))
            }),
            // A place not known may be the home directory.
            None => self
                .cwds
                .iter()
                .any(|c| c.as_ref().is_none_or(|c| receives_startup_files(c))),
        }
    }

    /// [`Walker::extracts_into_startup_dirs`] for each of `dirs` (the shell's directory when
    /// there is none).
    fn extracts_into_any(&self, dirs: &[&str]) -> bool {
        if dirs.is_empty() {
            self.extracts_into_startup_dirs(None)
        } else {
            dirs.iter()
                .any(|d| self.extracts_into_startup_dirs(Some(d)))
        }
    }

    /// Each of `files` is written: `Write` at least, more for a startup or account file.
    fn writes_to(&mut self, files: &[&str]) -> OperationClass {
        for f in files {
            if *f != "-" {
                self.written_text(f);
            }
        }
        if files.iter().any(|f| *f != "-") {
            Write
        } else {
            Read
        }
    }

    /// A downloader saving under the names of the URLs it is given: each name is written in
    /// the current directory; names the server chooses (`named_by_server`) could be any.
    fn downloaded_names(&mut self, args: &[&str], named_by_server: bool, dir: Option<&str>) {
        if named_by_server {
            self.key("files named by the server");
            self.raise(Privilege);
            return;
        }
        for url in args.iter().filter(|a| a.contains("://")) {
            let name = url_file(url).unwrap_or("index.html");
            self.written_text(&in_dir(dir, name));
        }
    }

    fn curl(&mut self, words: &[WordText], args: &[&str]) -> OperationClass {
        // A config file may set any option (`output`, `upload-file`…).
        if flag(args, Some('K'), Some("config"), 2)
            || words.iter().any(|w| w.dynamic && w.text.starts_with('-'))
        {
            self.key("curl config");
            self.raise(Privilege);
        }
        let mut out: Vec<&str> = Vec::new();
        for (short, long) in [
            (Some('o'), "output"),
            (None, "output-dir"),
            (Some('D'), "dump-header"),
            (Some('c'), "cookie-jar"),
            (None, "trace"),
            (None, "trace-ascii"),
            (None, "stderr"),
            (None, "libcurl"),
            (None, "etag-save"),
            (None, "hsts"),
            (None, "alt-svc"),
        ] {
            // curl 7 takes unambiguous abbreviations; `--cookie` is not `--cookie-jar`.
            let min = if long == "cookie-jar" { 7 } else { 1 };
            out.extend(values(args, short, Some(long), min));
        }
        // `-w '%output{file}'` writes where it says.
        for w in values(args, Some('w'), Some("write-out"), 1) {
            if w.contains("%output{") {
                self.key("curl --write-out to a file");
                self.raise(Privilege);
            }
        }
        let wrote = self.writes_to(&out);
        let remote_name = flag(args, Some('O'), Some("remote-name"), 11)
            || flag(args, None, Some("remote-name-all"), 15);
        if remote_name {
            let by_server = flag(args, Some('J'), Some("remote-header-name"), 18);
            let dir = values(args, None, Some("output-dir"), 10).last().copied();
            self.downloaded_names(args, by_server, dir);
            return Write;
        }
        // An upload to a file URL writes that file on the host (a URL ending in `/` gets
        // the uploaded file's name; a glob could be any file).
        let uploads = values(args, Some('T'), Some("upload-file"), 1);
        if !uploads.is_empty() {
            let mut urls: Vec<&str> = args.to_vec();
            urls.extend(values(args, None, Some("url"), 1));
            for url in urls {
                let Some(rest) = url
                    .get(..7)
                    .filter(|s| s.eq_ignore_ascii_case("file://"))
                    .and_then(|_| url.get(7..))
                else {
                    continue;
                };
                let path = rest.find('/').map_or(rest, |i| &rest[i..]);
                if path.contains(['{', '[']) {
                    self.key("curl upload to file URLs");
                    self.raise(Privilege);
                } else if path.ends_with('/') {
                    for u in &uploads {
                        self.written_text(&format!("{path}{}", basename(u)));
                    }
                } else {
                    self.written_text(path);
                }
            }
        }
        if flag(args, Some('T'), Some("upload-file"), 11)
            || flag(args, Some('d'), Some("data"), 4)
            || flag(args, Some('F'), Some("form"), 4)
        {
            // Sends a local file or data: a write on the far side.
            return Write;
        }
        wrote
    }

    fn wget(&mut self, args: &[&str]) -> OperationClass {
        if flag(args, None, Some("use-askpass"), 1)
            || values(args, Some('e'), Some("execute"), 3).iter().any(|c| {
                c.to_ascii_lowercase()
                    .replace(['_', '-'], "")
                    .starts_with("useaskpass")
            })
        {
            self.key("runs a program");
            return Exec;
        }
        let mut logs = values(args, Some('o'), Some("output-file"), 1);
        logs.extend(values(args, Some('a'), Some("append-output"), 1));
        let logged = self.writes_to(&logs);
        if flag(args, None, Some("spider"), 2) {
            return logged;
        }
        // wgetrc commands may set where files go.
        if !values(args, Some('e'), Some("execute"), 3).is_empty()
            || flag(args, None, Some("config"), 3)
        {
            self.key("wgetrc commands");
            self.raise(Privilege);
        }
        let docs = values(args, Some('O'), Some("output-document"), 1);
        if !docs.is_empty() {
            // `-O -`: the document goes to standard output.
            return self.writes_to(&docs);
        }
        let by_server = flag(args, Some('r'), Some("recursive"), 1)
            || flag(args, Some('m'), Some("mirror"), 1)
            || flag(args, Some('i'), Some("input-file"), 1)
            || flag(args, None, Some("content-disposition"), 1)
            || flag(args, None, Some("trust-server-names"), 1);
        let dir = values(args, Some('P'), Some("directory-prefix"), 1)
            .last()
            .copied();
        self.downloaded_names(args, by_server, dir);
        Write
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values_as_getopt_reads_them() {
        let a = [
            "-u",
            "-o",
            "x",
            "-ruoy",
            "--output=z",
            "--out",
            "w",
            "--",
            "-o",
            "v",
        ];
        assert_eq!(
            values(&a, Some('o'), Some("output"), 3),
            ["x", "y", "z", "w"]
        );
        assert!(flag(&["-xIzstd"], Some('I'), None, 0));
        assert!(flag(
            &["--use-comp=x"],
            None,
            Some("use-compress-program"),
            3
        ));
        assert!(!flag(&["--", "-I"], Some('I'), None, 0));
        assert_eq!(operands(&["-f", "2", "in", "out"], "f", &[]), ["in", "out"]);
        assert_eq!(operands(&["-f2", "in", "out"], "f", &[]), ["in", "out"]);
        assert_eq!(url_file("https://h/a/.bashrc?x=1"), Some(".bashrc"));
        assert_eq!(url_file("https://h"), None);
        for d in [
            ".",
            "~",
            "~/",
            ".ssh/",
            "/",
            "/root",
            "/etc/cron.d",
            "/home/u",
            "/home/u/.ssh",
            "../x",
            "/usr/local/bin",
            ".bashrc",
        ] {
            assert!(receives_startup_files(d), "{d}");
        }
        for d in [
            "app",
            "/srv/app/",
            "/tmp/x",
            "/home/u/project",
            "~/project/src",
        ] {
            assert!(!receives_startup_files(d), "{d}");
        }
    }
}
