//! A shell command line as guardrails see it. The line is parsed with brush-parser (the
//! POSIX/bash grammar: pipelines, lists, compound commands, functions, here-documents,
//! quoting, expansions), every simple command is found — also inside `$( )`, backticks,
//! process substitutions, `bash -c '…'`, `eval`, and behind wrappers such as `sudo`, `env`,
//! `xargs`, `timeout` or `find -exec` — its program name is resolved as the shell would
//! (quotes and escapes removed, path stripped), and each gets an operation class. The line's
//! class is the most severe. What cannot be parsed is refused; a program name that comes from
//! an expansion cannot be known, so it is `Exec` (held by default). A wrapper agentgate knows
//! (`strace`, `ssh-agent`, `xvfb-run`…), or a program it does not know, that is given a
//! shell, an interpreter, a wrapper or `sudo` as an operand is taken to run it: that command
//! is classified too. Every file a program writes (a redirection, `tee`, `dd of=`, `cp`'s
//! destination, `sort -o`, `openssl -out`…) meets one check: account, sudo, cron and
//! login-startup files are `Privilege`, devices `Admin`.

use std::collections::BTreeSet;

use agentgate_crds::OperationClass;
use brush_parser::ast;
use brush_parser::word::WordPiece;

/// The longest line classified.
pub const MAX_LEN: usize = 64 << 10;
/// How deep substitutions and `sh -c` strings may nest.
pub const MAX_DEPTH: usize = 32;

/// A command line as guardrails see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The most severe class of any command in it.
    pub class: OperationClass,
    /// What guardrails' `matches` globs are compared with: each command's program name
    /// (`rm`), `name first-argument` (`systemctl restart`), its whole normalized line
    /// (`rm -rf /tmp/x`), and special keys: `rm -rf /`, `curl | sh`, `dynamic command`,
    /// `fork bomb`.
    pub keys: BTreeSet<String>,
    /// Every simple command, normalized (words unquoted, joined by one space), in order,
    /// including those inside substitutions, compound commands and behind wrappers: what a
    /// scope's `ssh.commands` globs must all match.
    pub commands: Vec<String>,
    /// Where the shell may be after the line: where it was, and wherever a `cd` in the line
    /// may have taken it (a `cd` that fails leaves it where it was).
    pub cwds: Cwds,
}

/// Where the shell may be: each directory it may be in (`~` and `~/…` in the login's home,
/// or absolute), and `None` for a place that cannot be known (`cd "$d"`, `cd -`, `popd`, a
/// name that `CDPATH` may find elsewhere). Relative paths written are checked under each.
pub type Cwds = Vec<Option<String>>;

/// The key of an `scp -t` upload: the sender names what it writes. The gateway checks a
/// plain one file by file as it passes; anywhere else (inside a shell line) it is Privilege.
pub const SCP_UNCHECKED: &str = "scp upload, files named by the sender";

/// The most places tracked; past it, only "unknown" is added.
const MAX_CWDS: usize = 32;

/// Where a session starts: the login's home directory.
pub fn home() -> Cwds {
    vec![Some("~".into())]
}

/// Why a line cannot be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unparsable {
    /// The shell grammar does not accept it.
    #[error("not valid shell syntax: {0}")]
    Syntax(String),
    /// Longer than [`MAX_LEN`].
    #[error("the command is longer than 64 KiB")]
    TooLong,
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("substitutions nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// NUL or other control bytes.
    #[error("the command holds control bytes")]
    Binary,
}

/// The more severe of two classes.
pub fn more_severe(a: OperationClass, b: OperationClass) -> OperationClass {
    if severity(b) > severity(a) { b } else { a }
}

fn severity(c: OperationClass) -> u8 {
    match c {
        OperationClass::Read => 0,
        OperationClass::Write => 1,
        OperationClass::Ddl => 2,
        OperationClass::Exec => 3,
        OperationClass::Privilege => 4,
        OperationClass::Admin => 5,
    }
}

fn options() -> brush_parser::ParserOptions {
    brush_parser::ParserOptions::default()
}

fn parse_program(text: &str) -> Result<ast::Program, brush_parser::ParseError> {
    let text = text.to_owned();
    std::panic::catch_unwind(move || {
        let mut p = brush_parser::Parser::new(std::io::Cursor::new(text.as_bytes()), &options());
        p.parse_program()
    })
    .unwrap_or(Err(brush_parser::ParseError::ParsingAtEndOfInput))
}

fn parse_word(text: &str) -> Option<Vec<brush_parser::word::WordPieceWithSource>> {
    let text = text.to_owned();
    std::panic::catch_unwind(move || brush_parser::word::parse(&text, &options()).ok())
        .ok()
        .flatten()
}

/// How deeply brackets and compound keywords may nest in one line (checked before parsing:
/// the parser recurses per level, and a stack overflow would end the process).
const MAX_NESTING: usize = 48;

/// An upper bound of the line's nesting: brackets and compound-command keywords, quotes
/// ignored (a line that needs more is refused, never parsed).
fn nesting(line: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut in_backquote = false;
    for word in line.split(|c: char| c.is_whitespace() || c == ';') {
        match word {
            "if" | "while" | "until" | "for" | "case" | "select" | "function" => depth += 1,
            "fi" | "done" | "esac" => depth = depth.saturating_sub(1),
            _ => {}
        }
        max = max.max(depth);
        for c in word.chars() {
            match c {
                '(' | '{' | '[' => depth += 1,
                '`' if in_backquote => {
                    in_backquote = false;
                    depth = depth.saturating_sub(1);
                }
                '`' => {
                    in_backquote = true;
                    depth += 1;
                }
                ')' | '}' | ']' => depth = depth.saturating_sub(1),
                _ => {}
            }
            max = max.max(depth);
        }
    }
    max
}

fn check_bytes(line: &str) -> Result<(), Unparsable> {
    if line.len() > MAX_LEN {
        return Err(Unparsable::TooLong);
    }
    if nesting(line) > MAX_NESTING {
        return Err(Unparsable::TooDeep);
    }
    if line
        .bytes()
        .any(|b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || b == 0x7f)
    {
        return Err(Unparsable::Binary);
    }
    let open = open_parentheses(line);
    if open > MAX_OPEN_PARENTHESES {
        return Err(Unparsable::Syntax(format!(
            "{open} parentheses are left open (at most {MAX_OPEN_PARENTHESES})"
        )));
    }
    if let Some(n) = huge_fd(line) {
        return Err(Unparsable::Syntax(format!(
            "file descriptor {n}… in a redirection is too large"
        )));
    }
    Ok(())
}

/// How many parentheses a line may leave open (a command continued on the next line): the
/// shell parser's time doubles with each one left open, so more are refused before parsing.
const MAX_OPEN_PARENTHESES: usize = 8;

/// The parentheses outside quotes left open at the end of `line`.
fn open_parentheses(line: &str) -> usize {
    let (mut depth, mut single, mut double, mut escaped) = (0usize, false, false, false);
    for c in line.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if !single => escaped = true,
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '(' if !single && !double => depth += 1,
            ')' if !single && !double => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    depth
}

/// The first digits of a redirection's file descriptor (`12>`, `3<&0`) too large to be one:
/// bash refuses it, and the shell parser agentgate uses would fail on it.
fn huge_fd(line: &str) -> Option<&str> {
    let b = line.as_bytes();
    let mut start = None;
    for (i, &c) in b.iter().enumerate() {
        if c.is_ascii_digit() {
            let boundary = i == 0
                || matches!(
                    b[i - 1],
                    b' ' | b'\t' | b'\n' | b';' | b'|' | b'&' | b'(' | b')' | b'<' | b'>'
                );
            if start.is_none() && boundary {
                start = Some(i);
            }
            continue;
        }
        if let Some(s) = start.take()
            && matches!(c, b'<' | b'>')
            && i - s > 9
        {
            return line.get(s..s + 9);
        }
    }
    None
}

/// Parses and classifies one command line (an exec request, or a complete interactive line)
/// run in the login's home directory.
pub fn classify(line: &str) -> Result<Parsed, Unparsable> {
    classify_in(line, &home())
}

/// What each simple command of a parsed line meets the guardrails with (its class and
/// keys), then the line as a whole (`keys`: what only the whole shows, such as `curl | sh`);
/// empty for a single command, or when a command does not read back as a line of its own
/// (the line then meets them as one).
pub fn parts(
    parsed: &Parsed,
    keys: &BTreeSet<String>,
    cwds: &[Option<String>],
) -> Vec<(OperationClass, BTreeSet<String>)> {
    if parsed.commands.len() < 2 {
        return Vec::new();
    }
    parsed
        .commands
        .iter()
        .map(|c| classify_in(c, cwds).ok().map(|p| (p.class, p.keys)))
        .chain(std::iter::once(Some((parsed.class, keys.clone()))))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_default()
}

/// Parses and classifies one command line run where the shell may be (`cwds`, what the
/// session's earlier lines left: [`Parsed::cwds`]).
pub fn classify_in(line: &str, cwds: &[Option<String>]) -> Result<Parsed, Unparsable> {
    check_bytes(line)?;
    // Every write in the line is checked under every place a `cd` in it may lead (a loop or
    // a function runs its writes after a later `cd`); walked again until no new place
    // appears.
    let initial: Cwds = if cwds.is_empty() {
        vec![None]
    } else {
        cwds.to_vec()
    };
    let mut start = initial.clone();
    let mut pass = 0;
    loop {
        let mut w = Walker {
            class: OperationClass::Read,
            keys: BTreeSet::new(),
            commands: Vec::new(),
            cwds: start.clone(),
            next_cwds: start.clone(),
            cd_to: None,
            here: initial.clone(),
            repeats: 0,
        };
        w.line(line, 0)?;
        if w.next_cwds.len() > start.len() && pass < 3 {
            pass += 1;
            start = w.next_cwds;
            if pass == 3 && !start.contains(&None) {
                start.push(None);
            }
            continue;
        }
        if let Some(what) = evaluated_later(line) {
            w.raise(OperationClass::Exec);
            w.keys.insert(format!("runs code: {what}"));
        }
        // A `cd` to a place the check cannot follow (`cd "$d"`, `cd -`, `popd`): every
        // relative path written after it, on this line or later ones, could be any file.
        // The line is held, so a person sees where it goes.
        if w.next_cwds.contains(&None) && !initial.contains(&None) {
            w.raise(OperationClass::Exec);
            w.keys
                .insert("the shell's directory cannot be followed".to_owned());
        }
        return Ok(Parsed {
            class: w.class,
            keys: w.keys,
            commands: w.commands,
            cwds: w.next_cwds,
        });
    }
}

/// `p` (relative) under the directory `dir` (absolute, or `~…`), normalized. Climbing out
/// of the home directory leads to one of its ancestors (`/home`, or `/` for `/root`): taken
/// as `/`, where relative paths name the most (`etc/sudoers`).
pub(super) fn join_dir(dir: &str, p: &str) -> Option<String> {
    let Some(rest) = dir.strip_prefix('~') else {
        return Some(normalize_path(&format!("{dir}/{p}")));
    };
    let mut parts: Vec<&str> = Vec::new();
    let mut above_home = false;
    for seg in rest.split('/').chain(p.split('/')) {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    above_home = true;
                }
            }
            s => parts.push(s),
        }
    }
    Some(if above_home {
        format!("/{}", parts.join("/"))
    } else if parts.is_empty() {
        "~".into()
    } else {
        format!("~/{}", parts.join("/"))
    })
}

/// The parts of `line` outside single quotes (where bash expands anything).
fn unquoted(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut single = false;
    let mut escaped = false;
    for c in line.chars() {
        if single {
            if c == '\'' {
                single = false;
                out.push(' ');
            }
            continue;
        }
        if escaped {
            escaped = false;
            out.push(' ');
            continue;
        }
        match c {
            '\\' => escaped = true,
            '\'' => single = true,
            _ => out.push(c),
        }
    }
    out
}

/// Why bash would evaluate text of `line` as code that the parse does not show, if it
/// would: data turned into code later (prompt expansion `${x@P}`, indirection `${!x}`,
/// arithmetic, which evaluates array subscripts such as `a[$(cmd)]` held in variables),
/// variables that run code set without an assignment word (`for PROMPT_COMMAND in …`,
/// `read PS1`), extended globs (`!(…)`, which bash without extglob runs as a subshell),
/// and ANSI-C escapes the parser does not decode (`$'\u0073udo'`).
fn evaluated_later(line: &str) -> Option<&'static str> {
    let open = unquoted(line);
    if open.contains("@P}") {
        return Some("prompt expansion of a value");
    }
    if open.contains("${!") {
        return Some("indirect expansion");
    }
    // zsh: parameter flags (`${(e)x}` runs the substitutions in a value) and glob
    // substitution (`$~x`, where a value's glob qualifiers run code).
    if open.contains("${(") || open.contains("${~") || open.contains("$~") {
        return Some("a zsh expansion that evaluates a value");
    }
    // Arithmetic on literals is harmless; a name in it is evaluated as arithmetic in turn.
    for start in ["((", "$["] {
        let mut rest = open.as_str();
        while let Some(i) = rest.find(start) {
            let body = &rest[i + start.len()..];
            let end = body
                .find(if start == "((" { "))" } else { "]" })
                .unwrap_or(body.len());
            if body[..end]
                .chars()
                .any(|c| c.is_ascii_alphabetic() || c == '_')
            {
                return Some("arithmetic on a variable (bash evaluates what it holds)");
            }
            rest = &body[end..];
        }
    }
    if open.contains("[[")
        && ["-eq", "-ne", "-lt", "-le", "-gt", "-ge", "-v", "-R"]
            .iter()
            .any(|op| open.split_whitespace().any(|w| w == *op))
    {
        return Some("arithmetic or variable tests in [[ ]]");
    }
    if ["!(", "@(", "+(", "?(", "*("]
        .iter()
        .any(|p| open.contains(p))
    {
        return Some("an extended glob");
    }
    let code_vars = RUNS_CODE_ENV.iter().chain(
        [
            "PS0",
            "PS1",
            "PS2",
            "PS3",
            "PS4",
            "BASH_ALIASES",
            "BASH_CMDS",
        ]
        .iter(),
    );
    let words: Vec<&str> = open
        .split(|c: char| c.is_whitespace() || matches!(c, ';' | '&' | '|' | '(' | ')' | '"'))
        .collect();
    if code_vars.clone().any(|v| words.contains(v)) {
        return Some("a variable that runs code, named as a word");
    }
    // Assigned by an expansion: `: ${PROMPT_COMMAND:=cmd}`.
    if code_vars
        .clone()
        .any(|v| open.contains(&format!("${{{v}:=")) || open.contains(&format!("${{{v}=")))
    {
        return Some("a variable that runs code, assigned by an expansion");
    }
    // `$'…'` with escapes beyond the ones decoded for the check.
    let mut rest = line;
    while let Some(i) = rest.find("$'") {
        let body = &rest[i + 2..];
        let end = body.find('\'').unwrap_or(body.len());
        if ["\\u", "\\U", "\\c"]
            .iter()
            .any(|e| body[..end].contains(e))
        {
            return Some("an ANSI-C escape");
        }
        rest = &body[end.min(body.len())..];
        if rest.is_empty() {
            break;
        }
        rest = &rest[1..];
    }
    None
}

/// Why an interactive bash would expand history in `line` before running it, if it would:
/// a `!` outside single quotes followed by anything but a blank, `=` or `(`, or a line
/// starting with `^` (quick substitution).
pub fn history_expansion(line: &str) -> Option<String> {
    if line.trim_start().starts_with('^') {
        return Some(
            "history substitution (^old^new) is refused: bash would run a command agentgate did not see"
                .into(),
        );
    }
    let open = unquoted(line);
    let chars: Vec<char> = open.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if *c == '!' {
            match chars.get(i + 1) {
                None => {}
                Some(n) if n.is_whitespace() || matches!(n, '=' | '(') => {}
                Some(_) => {
                    return Some(
                        "history expansion (!) is refused in an interactive shell: bash would run a command agentgate did not see; quote the ! ('!') or put a space after it".into(),
                    );
                }
            }
        }
    }
    None
}

/// Whether `text` is an incomplete command the shell would ask more lines for: an
/// unterminated quote, a trailing backslash, an open `$(` or backtick, an unclosed
/// `if`/`for`/`while`/`case`/`{`/`(`, a here-document whose terminator has not come, a
/// trailing `|`, `&&` or `||`.
pub fn is_incomplete(text: &str) -> bool {
    if check_bytes(text).is_err() {
        return false;
    }
    if text.ends_with('\\') && !text.ends_with("\\\\") {
        return true;
    }
    match parse_program(text) {
        Ok(_) => false,
        Err(brush_parser::ParseError::ParsingAtEndOfInput) => true,
        Err(brush_parser::ParseError::Tokenizing { inner, .. }) => inner.is_incomplete(),
        Err(brush_parser::ParseError::ParsingNear(_)) => false,
    }
}

/// journalctl's options that change the journal or write files, by their long names.
const JOURNAL_WRITES: [&str; 11] = [
    "vacuum-size",
    "vacuum-files",
    "vacuum-time",
    "rotate",
    "flush",
    "sync",
    "relinquish-var",
    "smart-relinquish-var",
    "setup-keys",
    "update-catalog",
    "cursor-file",
];

/// Whether `arg` is one of [`JOURNAL_WRITES`] as journalctl reads it: getopt_long takes any
/// unambiguous beginning of a long option (`--rot` is `--rotate`); an ambiguous one counts
/// too.
fn journal_write_option(arg: &str) -> bool {
    arg.strip_prefix("--")
        .map(|o| o.split('=').next().unwrap_or(o))
        // (An option's whole name is that option: `--cursor` reads.)
        .is_some_and(|o| {
            !o.is_empty() && o != "cursor" && JOURNAL_WRITES.iter().any(|w| w.starts_with(o))
        })
}

/// A here-document delimiter after bash's quote removal: a backslash outside quotes escapes
/// the next character, nothing is special inside single quotes, and inside double quotes a
/// backslash escapes only `$`, `` ` ``, `"`, `\` and a newline. `None` for what no plain
/// reading settles (`$'…'`, `$"…"`, an unclosed quote).
fn bash_unquoted(tag: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = tag.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    c => out.push(c),
                }
            },
            '"' => loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => match chars.next()? {
                        c @ ('$' | '`' | '"' | '\\' | '\n') => out.push(c),
                        c => {
                            out.push('\\');
                            out.push(c);
                        }
                    },
                    c => out.push(c),
                }
            },
            '$' if matches!(chars.peek(), Some('\'' | '"')) => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// A word as the shell would see it after quote removal, and whether it can be known.
#[derive(Debug, Clone, Default)]
struct WordText {
    text: String,
    /// Comes (partly) from an expansion: parameter, command substitution, arithmetic.
    dynamic: bool,
    /// Holds unquoted glob characters or brace expansion: the shell may turn it into other
    /// words.
    pattern: bool,
}

struct Walker {
    class: OperationClass,
    keys: BTreeSet<String>,
    commands: Vec<String>,
    /// Where the shell may be while the line runs.
    cwds: Cwds,
    /// Where it may be after (`cwds` and every `cd` target found).
    next_cwds: Cwds,
    /// Where the last `cd` walked may have led.
    cd_to: Option<Cwds>,
    /// Where the shell may be at this point of the walk, from the line's start: what a
    /// relative `cd` starts from (`cwds` also holds places only later `cd`s reach).
    here: Cwds,
    /// Inside a loop or a function body (which may run many times: a relative `cd` there
    /// can lead deeper each time).
    repeats: usize,
}

/// Interactive programs with a way to run shell commands from inside them.
const SHELL_ESCAPES: [&str; 28] = [
    "vi",
    "vim",
    "nvim",
    "view",
    "vimdiff",
    "ex",
    "ed",
    "emacs",
    "nano",
    "pico",
    "less",
    "more",
    "most",
    "man",
    "pg",
    "ftp",
    "gdb",
    "lldb",
    "mysql",
    "psql",
    "sqlite3",
    "mongo",
    "mongosh",
    "redis-cli",
    "screen",
    "tmux",
    "script",
    "expect",
];

/// Variables that make the shell or a program run code they name.
const RUNS_CODE_ENV: [&str; 23] = [
    "PROMPT_COMMAND",
    "PATH",
    "BASH_ENV",
    "ENV",
    "EDITOR",
    "VISUAL",
    "SHELLOPTS",
    "BASHOPTS",
    "IFS",
    "PERL5OPT",
    "PERL5LIB",
    "PYTHONSTARTUP",
    "PYTHONPATH",
    "NODE_OPTIONS",
    "RUBYOPT",
    "LESSOPEN",
    // Not code, but where `cd NAME` goes, and how GNU programs read their options: the
    // check could not follow them.
    "CDPATH",
    "POSIXLY_CORRECT",
    // Options programs read from the environment: `--to-command`, a remote shell, where
    // backups land.
    "TAR_OPTIONS",
    "RSYNC_RSH",
    "RSYNC_CONNECT_PROG",
    "SIMPLE_BACKUP_SUFFIX",
    "VERSION_CONTROL",
];

/// Programs that run other programs, escalate, or change how later commands run.
const RUNS_CODE: &[&str] = &[
    // History and editing: run an earlier or edited command.
    "fc",
    "history",
    // Builtins that call back into code they are given.
    "mapfile",
    "readarray",
    "compgen",
    // Wrappers that run the program they are given (unknown to the unwrapping below).
    "setarch",
    "linux32",
    "linux64",
    "i386",
    "x86_64",
    "prlimit",
    "choom",
    "numactl",
    "rlwrap",
    "parallel",
    "sshpass",
    "gosu",
    "su-exec",
    "fakeroot",
    "systemd-inhibit",
    "dbus-run-session",
    "chronic",
    "ifne",
    "pee",
    "flock",
    "runuser",
    "alias",
    "hash",
    "enable",
    "trap",
    "bind",
    "complete",
    "stty",
    "let",
    "dc",
    "strace",
    "ltrace",
    "nsenter",
    "unshare",
    "systemd-run",
    "toybox",
    "at",
    "batch",
    "capsh",
    "setpriv",
    "firejail",
    "bwrap",
    "xdg-open",
    "declare",
    "typeset",
    "export",
    "readonly",
    // zsh: re-run history, edit buffers and key bindings that type commands, modules and
    // functions loaded from files, code given as text or run later, options that turn data
    // into code (`setopt globsubst`).
    "r",
    "vared",
    "zle",
    "bindkey",
    "zmodload",
    "autoload",
    "zpty",
    "sched",
    "emulate",
    "zstyle",
    "setopt",
    "unsetopt",
    "functions",
    // Wrappers that run the command they are given, with an environment, a tracer, a
    // display, a proxy, a lock or a sandbox of their own.
    "ssh-agent",
    "systemd-cat",
    "dbus-launch",
    "xvfb-run",
    "xinit",
    "startx",
    "valgrind",
    "perf",
    "proot",
    "fakechroot",
    "faketime",
    "datefudge",
    "torify",
    "torsocks",
    "proxychains",
    "proxychains4",
    "tsocks",
    "eatmydata",
    "nocache",
    "catchsegv",
    "cpulimit",
    "trickle",
    "logsave",
    "runcon",
    "chpst",
    "setuidgid",
    "envdir",
    "envuidgid",
    "softlimit",
    "cgexec",
    "entr",
    "mpirun",
    "mpiexec",
    "srun",
    "schroot",
    "systemd-nspawn",
    "machinectl",
    "flatpak-spawn",
    "hwloc-bind",
    "lckdo",
    "setlock",
    "with-lock-ex",
    "run-parts",
    "run-one",
    "daemonize",
    "start-stop-daemon",
    "dtach",
    "abduco",
    "reptyr",
    "winpty",
    "xterm",
    "x-terminal-emulator",
    "gnome-terminal",
    "konsole",
    "mispipe",
    "vipe",
    "nq",
    "tsp",
];

/// [`RUNS_CODE`] entries that are shell builtins or take code as text (their operands are
/// no program to look for), or whose name is a common word.
const RUNS_CODE_NOT_ARGV: &[&str] = &[
    "fc",
    "history",
    "mapfile",
    "readarray",
    "compgen",
    "alias",
    "hash",
    "enable",
    "trap",
    "bind",
    "complete",
    "stty",
    "let",
    "dc",
    "declare",
    "typeset",
    "export",
    "readonly",
    "r",
    "vared",
    "zle",
    "bindkey",
    "zmodload",
    "autoload",
    "zpty",
    "sched",
    "emulate",
    "zstyle",
    "setopt",
    "unsetopt",
    "functions",
    "at",
    "batch",
    "xdg-open",
];

/// [`RUNS_CODE`] wrappers whose names are also common words (a test's name, an
/// architecture): as an operand of another program they are not taken for a command.
const RUNS_CODE_COMMON_WORDS: &[&str] = &[
    "perf", "parallel", "i386", "x86_64", "linux32", "linux64", "nq", "tsp",
];

/// Programs that run another as a user they switch to.
const ESCALATES: &[&str] = &[
    "sudo", "su", "doas", "pkexec", "run0", "sudoedit", "runuser", "gosu", "su-exec", "setpriv",
    "capsh", "sg", "newgrp", "chroot", "nsenter", "unshare",
];

/// Wrappers unwrapped by [`Walker::argv`] itself (whose names are no common word).
const WRAPPERS: &[&str] = &[
    "env",
    "nice",
    "nohup",
    "stdbuf",
    "ionice",
    "setsid",
    "busybox",
    "toybox",
    "chrt",
    "taskset",
    "unbuffer",
    "caffeinate",
    "timeout",
    "flock",
    "xargs",
    "eval",
    "exec",
];

/// Whether a word names a program that runs code of its own choosing or escalates: a shell,
/// an interpreter, a program that switches user, a wrapper that runs the command it is
/// given, or an editor or pager with a shell escape. An operand of an unknown program (or a
/// wrapper) that names one is taken as the command it runs.
fn runs_programs(name: &str) -> bool {
    // (`python3.11`, not `python-dateutil` or an image name `python:3`.)
    let interpreter = match name.strip_prefix("python") {
        Some(version) => version.chars().all(|c| c.is_ascii_digit() || c == '.'),
        None => is_interpreter(name),
    };
    SHELLS.contains(&name)
        || interpreter
        || ESCALATES.contains(&name)
        || WRAPPERS.contains(&name)
        || (RUNS_CODE.contains(&name)
            && !RUNS_CODE_NOT_ARGV.contains(&name)
            && !RUNS_CODE_COMMON_WORDS.contains(&name))
        || matches!(
            name,
            "vi" | "vim" | "nvim" | "emacs" | "nano" | "less" | "gdb" | "lldb" | "tmux"
        )
}

/// Programs the table below knows, which may still fall through to its default (a plain
/// `Write`): their operands are files, not commands.
const KNOWN_WRITERS: &[&str] = &[
    "tar", "gtar", "bsdtar", "scp", "sftp", "make", "gmake", "zip", "unzip", "cpio", "7z", "7za",
    "7zr", "shred", "wipefs", "pax", "ar",
];

/// How many operands of one program are followed as commands it may run.
const MAX_WRAPPED: usize = 8;

const DOWNLOADERS: [&str; 4] = ["curl", "wget", "fetch", "aria2c"];
const SHELLS: [&str; 8] = ["sh", "bash", "zsh", "dash", "ksh", "ash", "fish", "mksh"];

fn is_interpreter(name: &str) -> bool {
    SHELLS.contains(&name)
        || name.starts_with("python")
        || matches!(
            name,
            "perl"
                | "ruby"
                | "node"
                | "nodejs"
                | "php"
                | "lua"
                | "Rscript"
                | "tclsh"
                | "pwsh"
                | "deno"
                | "bun"
                | "irb"
                | "jshell"
                | "osascript"
        )
}

fn basename(s: &str) -> &str {
    let t = s.trim_end_matches('/');
    t.rsplit('/').next().unwrap_or(t)
}

impl Walker {
    fn raise(&mut self, c: OperationClass) {
        if severity(c) > severity(self.class) {
            self.class = c;
        }
    }

    fn key(&mut self, k: impl Into<String>) {
        self.keys.insert(k.into());
    }

    /// Each path `p` may name: itself, and a relative `p` under each place the shell may be.
    fn resolve(&self, p: &str) -> Vec<String> {
        let mut out = vec![normalize_path(p)];
        if p.is_empty() || p.starts_with(['/', '~', '$']) {
            return out;
        }
        for dir in self.cwds.iter().flatten() {
            if let Some(j) = join_dir(dir, p)
                && !out.contains(&j)
            {
                out.push(j);
            }
        }
        out
    }

    /// Whether `p` is the root, a top-level directory or the home directory (`rm -rf`'s
    /// disasters) wherever the shell may be. The current directory itself (`find .`) counts
    /// only where a `cd` led, not as the home directory a session starts in.
    fn root_path(&self, p: &str) -> bool {
        is_root_path(p)
            || self
                .resolve(p)
                .iter()
                .filter(|r| r.as_str() != "~")
                .any(|r| is_root_path(r))
    }

    /// The most severe class of writing `p`, wherever the shell may be. (A line that takes
    /// the shell somewhere not known is held itself: see [`classify_in`].)
    fn write_class_of(&self, p: &str) -> OperationClass {
        self.resolve(p)
            .iter()
            .map(|r| write_class(r))
            .max_by_key(|c| severity(*c))
            .unwrap_or(OperationClass::Write)
    }

    fn add_cwd(&mut self, dir: Option<String>) {
        if self.next_cwds.contains(&dir) {
            return;
        }
        if self.next_cwds.len() >= MAX_CWDS {
            if !self.next_cwds.contains(&None) {
                self.next_cwds.push(None);
            }
            return;
        }
        self.next_cwds.push(dir);
    }

    /// `cd`, `pushd`, `popd`: where the shell may go.
    fn change_dir(&mut self, name: &str, args: &[WordText]) {
        let mut target = None;
        let mut options = true;
        for w in args {
            if options && w.text == "--" && !w.dynamic {
                options = false;
            } else if options && w.text.starts_with('-') && w.text != "-" && !w.dynamic {
                continue;
            } else {
                target = Some(w);
                break;
            }
        }
        // `cd "$HOME/x"` is `cd ~/x` (what follows `$HOME` must be plain).
        let home_relative = target.and_then(|w| {
            let rest = w
                .text
                .strip_prefix("${HOME}")
                .or_else(|| w.text.strip_prefix("$HOME"))?;
            (!rest.contains(['$', '`']) && (rest.is_empty() || rest.starts_with('/')))
                .then(|| format!("~{rest}"))
        });
        let t = match &home_relative {
            Some(h) => Some((h.as_str(), w_pattern(target))),
            None => target.map(|w| (w.text.as_str(), w.dynamic || w.pattern)),
        };
        let mut to: Cwds = Vec::new();
        match (name, t) {
            ("cd", None) => to.push(Some("~".into())),
            ("cd" | "chdir" | "pushd", Some((t, false)))
                if !(t.is_empty() || name == "pushd" && t.starts_with('+')) =>
            {
                if t == "~" || t.starts_with("~/") {
                    to.push(join_dir("~", &t[1..]));
                } else if t.starts_with('/') {
                    to.push(Some(normalize_path(t)));
                } else if t.starts_with(['~', '-', '$']) {
                    to.push(None);
                } else {
                    // (`CDPATH`, which would send a bare name elsewhere, is set only as code.)
                    for dir in &self.here {
                        to.push(dir.as_ref().and_then(|d| join_dir(d, t)));
                    }
                    if self.repeats > 0 {
                        to.push(None);
                    }
                }
            }
            _ => to.push(None),
        }
        to.dedup();
        for dir in &to {
            self.add_cwd(dir.clone());
            // A `cd` that fails leaves the shell where it was.
            if !self.here.contains(dir) && self.here.len() < MAX_CWDS {
                self.here.push(dir.clone());
            } else if !self.here.contains(dir) && !self.here.contains(&None) {
                self.here.push(None);
            }
        }
        self.cd_to = Some(to);
    }

    /// Parses a whole line (or the text of a substitution / `sh -c`) and walks it.
    fn line(&mut self, text: &str, depth: usize) -> Result<(), Unparsable> {
        if depth > MAX_DEPTH {
            return Err(Unparsable::TooDeep);
        }
        check_bytes(text)?;
        let program = parse_program(text).map_err(|e| Unparsable::Syntax(e.to_string()))?;
        for cc in &program.complete_commands {
            self.list(cc, depth)?;
        }
        Ok(())
    }

    fn list(&mut self, list: &ast::CompoundList, depth: usize) -> Result<(), Unparsable> {
        for ast::CompoundListItem(and_or, _) in &list.0 {
            // `cd DIR && …`: what follows runs only where the `cd` led (a failed `cd` runs
            // nothing more), so in a chain of `&&` it is checked there alone.
            let all_and = and_or
                .additional
                .iter()
                .all(|n| matches!(n, ast::AndOr::And(_)));
            let mut saved = None;
            let rest = and_or.additional.iter().map(|n| match n {
                ast::AndOr::And(p) | ast::AndOr::Or(p) => p,
            });
            for p in std::iter::once(&and_or.first).chain(rest) {
                self.cd_to = None;
                self.pipeline(p, depth)?;
                let lone = p.seq.len() == 1 && matches!(p.seq[0], ast::Command::Simple(_));
                if let Some(to) = self.cd_to.take()
                    && all_and
                    && lone
                {
                    let cwds = std::mem::replace(&mut self.cwds, to.clone());
                    let here = std::mem::replace(&mut self.here, to);
                    saved.get_or_insert((cwds, here));
                }
            }
            if let Some((cwds, here)) = saved {
                self.cwds = cwds;
                // After the chain the shell is where the chain's `cd`s left it, or where it
                // was (when one failed).
                for dir in std::mem::replace(&mut self.here, here) {
                    if !self.here.contains(&dir) && self.here.len() < MAX_CWDS {
                        self.here.push(dir);
                    }
                }
            }
        }
        Ok(())
    }

    fn pipeline(&mut self, p: &ast::Pipeline, depth: usize) -> Result<(), Unparsable> {
        let mut downloader_before = false;
        for (i, cmd) in p.seq.iter().enumerate() {
            let names = self.command(cmd, depth)?;
            if i > 0 {
                // An interpreter fed by a pipe runs whatever the pipe carries.
                for (name, reads_stdin) in &names {
                    if is_interpreter(name) && *reads_stdin {
                        self.raise(OperationClass::Exec);
                        self.key("interpreter reading a pipe");
                        if downloader_before {
                            self.raise(OperationClass::Admin);
                            self.key("curl | sh");
                        }
                    }
                }
            }
            if names.iter().any(|(n, _)| DOWNLOADERS.contains(&n.as_str())) {
                downloader_before = true;
            }
        }
        Ok(())
    }

    /// Walks one command; returns the programs it runs at its top (name, whether it reads its
    /// code from stdin), for pipeline checks.
    fn command(
        &mut self,
        cmd: &ast::Command,
        depth: usize,
    ) -> Result<Vec<(String, bool)>, Unparsable> {
        match cmd {
            ast::Command::Simple(s) => self.simple(s, depth),
            ast::Command::Compound(c, redirects) => {
                self.compound(c, depth)?;
                if let Some(r) = redirects {
                    for io in &r.0 {
                        self.redirect(io, depth)?;
                    }
                }
                Ok(Vec::new())
            }
            ast::Command::Function(f) => {
                self.raise(OperationClass::Exec);
                self.key("function definition");
                let before = self.commands.len();
                let ast::FunctionBody(body, redirects) = &f.body;
                self.repeated(|w| w.compound(body, depth))?;
                if let Some(r) = redirects {
                    for io in &r.0 {
                        self.redirect(io, depth)?;
                    }
                }
                // A function that calls itself (`:(){ :|:& };:`).
                let name = f.fname.value.clone();
                if self.commands[before..]
                    .iter()
                    .any(|c| c.split(' ').next() == Some(name.as_str()))
                {
                    self.raise(OperationClass::Admin);
                    self.key("fork bomb");
                }
                Ok(Vec::new())
            }
            ast::Command::ExtendedTest(t, redirects) => {
                self.opaque(&format!("{:?}", t.expr), depth)?;
                if let Some(r) = redirects {
                    for io in &r.0 {
                        self.redirect(io, depth)?;
                    }
                }
                Ok(Vec::new())
            }
        }
    }

    /// Text the walker cannot take apart further (a test expression, an arithmetic one): a
    /// substitution inside it runs a command nobody sees, so it is `Exec`.
    fn opaque(&mut self, text: &str, _depth: usize) -> Result<(), Unparsable> {
        if text.contains("$(") || text.contains('`') || text.contains("<(") || text.contains(">(") {
            self.raise(OperationClass::Exec);
            self.key("dynamic command");
        }
        Ok(())
    }

    /// Walks what may run many times (a loop or function body).
    fn repeated(
        &mut self,
        walk: impl FnOnce(&mut Self) -> Result<(), Unparsable>,
    ) -> Result<(), Unparsable> {
        self.repeats += 1;
        let r = walk(self);
        self.repeats -= 1;
        r
    }

    fn compound(&mut self, c: &ast::CompoundCommand, depth: usize) -> Result<(), Unparsable> {
        match c {
            ast::CompoundCommand::Arithmetic(a) => self.opaque(&a.expr.value, depth),
            ast::CompoundCommand::ArithmeticForClause(f) => {
                for e in [&f.initializer, &f.condition, &f.updater]
                    .into_iter()
                    .flatten()
                {
                    self.opaque(&e.value, depth)?;
                }
                self.repeated(|w| w.list(&f.body.list, depth))
            }
            ast::CompoundCommand::BraceGroup(b) => self.list(&b.list, depth),
            ast::CompoundCommand::Subshell(s) => self.list(&s.list, depth),
            ast::CompoundCommand::ForClause(f) => {
                for w in f.values.iter().flatten() {
                    self.word(&w.value, depth)?;
                }
                self.repeated(|w| w.list(&f.body.list, depth))
            }
            ast::CompoundCommand::CaseClause(c) => {
                self.word(&c.value.value, depth)?;
                for item in &c.cases {
                    for p in &item.patterns {
                        self.word(&p.value, depth)?;
                    }
                    if let Some(l) = &item.cmd {
                        self.list(l, depth)?;
                    }
                }
                Ok(())
            }
            ast::CompoundCommand::IfClause(i) => {
                self.list(&i.condition, depth)?;
                self.list(&i.then, depth)?;
                for e in i.elses.iter().flatten() {
                    if let Some(c) = &e.condition {
                        self.list(c, depth)?;
                    }
                    self.list(&e.body, depth)?;
                }
                Ok(())
            }
            ast::CompoundCommand::WhileClause(w) | ast::CompoundCommand::UntilClause(w) => self
                .repeated(|this| {
                    this.list(&w.0, depth)?;
                    this.list(&w.1.list, depth)
                }),
            ast::CompoundCommand::Coprocess(c) => {
                self.command(&c.body, depth)?;
                Ok(())
            }
        }
    }

    /// A word: its text after quote removal; substitutions inside are walked as commands.
    fn word(&mut self, raw: &str, depth: usize) -> Result<WordText, Unparsable> {
        if depth > MAX_DEPTH {
            return Err(Unparsable::TooDeep);
        }
        let pieces =
            parse_word(raw).ok_or_else(|| Unparsable::Syntax(format!("the word {raw:?}")))?;
        let mut out = WordText::default();
        self.pieces(raw, &pieces, false, depth, &mut out)?;
        Ok(out)
    }

    fn pieces(
        &mut self,
        raw: &str,
        pieces: &[brush_parser::word::WordPieceWithSource],
        quoted: bool,
        depth: usize,
        out: &mut WordText,
    ) -> Result<(), Unparsable> {
        for p in pieces {
            let source = raw.get(p.start_index..p.end_index).unwrap_or("");
            match &p.piece {
                WordPiece::Text(s) => {
                    if !quoted
                        && (s.contains(['*', '?', '['])
                            || (s.contains('{') && (s.contains(',') || s.contains(".."))))
                    {
                        out.pattern = true;
                    }
                    out.text.push_str(s);
                }
                WordPiece::SingleQuotedText(s) => out.text.push_str(s),
                WordPiece::AnsiCQuotedText(s) => out.text.push_str(&ansi_c(s)),
                WordPiece::DoubleQuotedSequence(inner)
                | WordPiece::GettextDoubleQuotedSequence(inner) => {
                    self.pieces(raw, inner, true, depth, out)?;
                }
                WordPiece::TildeExpansion(_) => out.text.push_str(source),
                WordPiece::ParameterExpansion(_) => {
                    out.dynamic = true;
                    out.text.push_str(source);
                    // `${x:-$(cmd)}`: a command hidden in an expansion's operand.
                    self.opaque(source, depth)?;
                }
                WordPiece::CommandSubstitution(s) | WordPiece::BackquotedCommandSubstitution(s) => {
                    out.dynamic = true;
                    out.text.push_str(source);
                    self.line(s, depth + 1)?;
                }
                WordPiece::EscapeSequence(s) => {
                    out.text.push_str(s.strip_prefix('\\').unwrap_or(s));
                }
                WordPiece::ArithmeticExpression(e) => {
                    out.dynamic = true;
                    out.text.push_str(source);
                    self.opaque(&e.value, depth)?;
                }
            }
        }
        Ok(())
    }

    /// Walks a redirection of a simple command into `redirects`; whether it feeds stdin.
    fn redirect_into(
        &mut self,
        io: &ast::IoRedirect,
        depth: usize,
        redirects: &mut Vec<String>,
    ) -> Result<bool, Unparsable> {
        if let Some(r) = self.redirect(io, depth)? {
            redirects.push(r);
        }
        Ok(matches!(
            io,
            ast::IoRedirect::HereDocument(..) | ast::IoRedirect::HereString(..)
        ))
    }

    fn redirect(
        &mut self,
        io: &ast::IoRedirect,
        depth: usize,
    ) -> Result<Option<String>, Unparsable> {
        match io {
            ast::IoRedirect::File(_, kind, target) => match target {
                ast::IoFileRedirectTarget::Filename(w) => {
                    let t = self.word(&w.value, depth)?;
                    let writes = !matches!(
                        kind,
                        ast::IoFileRedirectKind::Read
                            | ast::IoFileRedirectKind::DuplicateInput
                            | ast::IoFileRedirectKind::DuplicateOutput
                    );
                    if writes {
                        self.written(&t);
                    }
                    let op = match kind {
                        ast::IoFileRedirectKind::Read => "<",
                        ast::IoFileRedirectKind::Write => ">",
                        ast::IoFileRedirectKind::Append => ">>",
                        ast::IoFileRedirectKind::ReadAndWrite => "<>",
                        ast::IoFileRedirectKind::Clobber => ">|",
                        ast::IoFileRedirectKind::DuplicateInput => "<&",
                        ast::IoFileRedirectKind::DuplicateOutput => ">&",
                    };
                    Ok(Some(format!("{op} {}", t.text)))
                }
                ast::IoFileRedirectTarget::Fd(_) => Ok(None),
                ast::IoFileRedirectTarget::Duplicate(w) => {
                    let t = self.word(&w.value, depth)?;
                    // `>&word` where word is no descriptor (digits, or `-` to close) sends
                    // standard output and error to the file `word`, as `&>word` does.
                    let digits = t.text.strip_suffix('-').unwrap_or(&t.text);
                    let descriptor = !t.dynamic
                        && (t.text == "-"
                            || (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())));
                    if matches!(kind, ast::IoFileRedirectKind::DuplicateOutput) && !descriptor {
                        self.written(&t);
                        return Ok(Some(format!(">& {}", t.text)));
                    }
                    Ok(None)
                }
                ast::IoFileRedirectTarget::ProcessSubstitution(_, sub) => {
                    self.list(&sub.list, depth + 1)?;
                    Ok(None)
                }
            },
            ast::IoRedirect::HereDocument(_, doc) => {
                // Where the document ends is the delimiter after bash's quote removal; a
                // delimiter the parser unquotes otherwise (`'E\OF'`: bash keeps the
                // backslash) would end it elsewhere, and what follows would run unseen.
                if bash_unquoted(&doc.here_end.value).as_deref()
                    != Some(brush_parser::unquote_str(&doc.here_end.value).as_str())
                {
                    return Err(Unparsable::Syntax(
                        "a here-document delimiter agentgate cannot read as bash does".into(),
                    ));
                }
                // With an unquoted delimiter bash joins a line ending in a backslash with
                // the next before it compares it with the delimiter (`EO\` + `F` ends the
                // document); the parser does not.
                if doc.requires_expansion && doc.doc.value.contains("\\\n") {
                    return Err(Unparsable::Syntax(
                        "a here-document with a line continued by a backslash (bash may end it elsewhere)".into(),
                    ));
                }
                if doc.requires_expansion {
                    let body = doc.doc.value.clone();
                    let pieces = std::panic::catch_unwind(move || {
                        brush_parser::word::parse_heredoc(&body, &options()).ok()
                    })
                    .ok()
                    .flatten()
                    .ok_or_else(|| Unparsable::Syntax("a here-document".into()))?;
                    let mut t = WordText::default();
                    self.pieces(&doc.doc.value, &pieces, true, depth, &mut t)?;
                }
                Ok(None)
            }
            ast::IoRedirect::HereString(_, w) => {
                self.word(&w.value, depth)?;
                Ok(None)
            }
            ast::IoRedirect::OutputAndError(w, _) => {
                let t = self.word(&w.value, depth)?;
                self.written(&t);
                Ok(Some(format!("&> {}", t.text)))
            }
        }
    }

    /// An assignment (`NAME=value`): some variables make later commands run code.
    fn assignment(&mut self, a: &str) {
        let name = a.split(['=', '+', '[']).next().unwrap_or("");
        if RUNS_CODE_ENV.contains(&name)
            || name.starts_with("LD_")
            || name.starts_with("GIT_")
            || name.starts_with("PS")
            || name.ends_with("PAGER")
            || name.starts_with("BASH_FUNC")
        {
            self.raise(OperationClass::Exec);
            self.key("environment that runs code");
        }
        if a.contains("$(") || a.contains('`') || a.contains('[') {
            self.raise(OperationClass::Exec);
            self.key("deferred substitution");
        }
    }

    /// The operands of a program that may run another (a wrapper, or a program agentgate
    /// does not know): each that names a shell, an interpreter, a program that escalates or
    /// a wrapper (see [`runs_programs`]) is classified from there with its arguments
    /// (`ssh-agent bash -c '…'`, `xvfb-run sudo id`), and the line is `Exec` at least; an
    /// option whose value names one (`--shell=/bin/bash`) makes it `Exec`. Whether one was
    /// found.
    fn wrapped(&mut self, operands: &[WordText], depth: usize) -> Result<bool, Unparsable> {
        let mut found = 0;
        for (i, w) in operands.iter().enumerate() {
            if w.dynamic || w.pattern {
                continue;
            }
            if let Some(opt) = w.text.strip_prefix('-') {
                if let Some((_, value)) = opt.split_once('=')
                    && runs_programs(basename(value))
                {
                    self.raise(OperationClass::Exec);
                    self.key("runs code");
                    self.key(format!("runs {}", basename(value)));
                    found += 1;
                }
                continue;
            }
            let name = basename(&w.text);
            if !runs_programs(name) {
                continue;
            }
            self.raise(OperationClass::Exec);
            self.key("runs code");
            found += 1;
            if found > MAX_WRAPPED {
                break;
            }
            self.argv(&operands[i..], "", &[], depth + 1)?;
        }
        Ok(found > 0)
    }

    /// The files a program agentgate does not know names as its output (`-o FILE`,
    /// `--output=FILE`, `--log-file FILE`): each is checked as a file written.
    fn unknown_outputs(&mut self, args: &[&str]) {
        let mut outs = effects::values(args, Some('o'), Some("output"), 6);
        for long in ["out", "outfile", "output-file", "log-file", "logfile"] {
            outs.extend(effects::values(args, None, Some(long), long.len()));
        }
        for o in outs {
            if o != "-" && !o.starts_with('-') {
                self.written(&WordText {
                    text: o.to_owned(),
                    ..Default::default()
                });
            }
        }
    }

    /// A file the command writes (a redirection, tee, dd of=).
    fn written(&mut self, t: &WordText) {
        let normalized = normalize_path(&t.text);
        let p = normalized.as_str();
        if matches!(p, "/dev/null" | "/dev/stdout" | "/dev/stderr" | "/dev/tty")
            || p.starts_with("/dev/fd/")
        {
            return;
        }
        let class = self.write_class_of(p);
        match class {
            OperationClass::Admin => self.key("write to a device"),
            OperationClass::Privilege => self.key("write to an account or startup file"),
            _ => {}
        }
        self.raise(class);
    }

    fn simple(
        &mut self,
        s: &ast::SimpleCommand,
        depth: usize,
    ) -> Result<Vec<(String, bool)>, Unparsable> {
        let mut words: Vec<WordText> = Vec::new();
        let mut assignments: Vec<String> = Vec::new();
        let mut redirects: Vec<String> = Vec::new();
        let mut stdin_redirected = false;
        for item in s.prefix.iter().flat_map(|p| p.0.iter()) {
            match item {
                ast::CommandPrefixOrSuffixItem::AssignmentWord(_, w) => {
                    let t = self.word(&w.value, depth)?;
                    assignments.push(t.text);
                }
                ast::CommandPrefixOrSuffixItem::Word(w) => words.push(self.word(&w.value, depth)?),
                ast::CommandPrefixOrSuffixItem::IoRedirect(io) => {
                    stdin_redirected |= self.redirect_into(io, depth, &mut redirects)?;
                }
                ast::CommandPrefixOrSuffixItem::ProcessSubstitution(_, sub) => {
                    self.list(&sub.list, depth + 1)?;
                }
            }
        }
        if let Some(w) = &s.word_or_name {
            words.push(self.word(&w.value, depth)?);
        }
        let mut process_subs = Vec::new();
        for item in s.suffix.iter().flat_map(|p| p.0.iter()) {
            match item {
                ast::CommandPrefixOrSuffixItem::Word(w) => words.push(self.word(&w.value, depth)?),
                ast::CommandPrefixOrSuffixItem::AssignmentWord(_, w) => {
                    words.push(self.word(&w.value, depth)?);
                }
                ast::CommandPrefixOrSuffixItem::IoRedirect(io) => {
                    stdin_redirected |= self.redirect_into(io, depth, &mut redirects)?;
                }
                ast::CommandPrefixOrSuffixItem::ProcessSubstitution(_, sub) => {
                    let before = self.commands.len();
                    self.list(&sub.list, depth + 1)?;
                    process_subs.push(self.commands[before..].to_vec());
                    words.push(WordText {
                        text: "<(…)".into(),
                        dynamic: true,
                        pattern: false,
                    });
                }
            }
        }
        for a in &assignments {
            self.assignment(a);
        }
        // A `cd` inside a substitution moves a subshell, not this shell.
        self.cd_to = None;
        if words.is_empty() {
            // Only assignments and redirections.
            let mut line = assignments.join(" ");
            for r in &redirects {
                line.push(' ');
                line.push_str(r);
            }
            let line = line.trim().to_owned();
            if !line.is_empty() {
                self.commands.push(line);
            }
            return Ok(Vec::new());
        }
        // An interpreter given a downloaded script: `bash <(curl …)`.
        let name = basename(&words[0].text).to_owned();
        if is_interpreter(&name)
            && process_subs
                .iter()
                .flatten()
                .any(|c| DOWNLOADERS.contains(&c.split(' ').next().unwrap_or("")))
        {
            self.raise(OperationClass::Admin);
            self.key("curl | sh");
        }
        let ran = self.argv(&words, &assignments.join(" "), &redirects, depth)?;
        Ok(ran
            .into_iter()
            .map(|(n, stdin)| (n, stdin && !stdin_redirected))
            .collect())
    }

    /// Classifies one program with its arguments (after unwrapping wrappers); returns the
    /// programs run (name, reads its code from stdin).
    fn argv(
        &mut self,
        words: &[WordText],
        assignments: &str,
        redirects: &[String],
        depth: usize,
    ) -> Result<Vec<(String, bool)>, Unparsable> {
        if depth > MAX_DEPTH {
            return Err(Unparsable::TooDeep);
        }
        let Some(first) = words.first() else {
            return Ok(Vec::new());
        };
        let args: Vec<&str> = words[1..].iter().map(|w| w.text.as_str()).collect();
        let mut line = String::new();
        if !assignments.is_empty() {
            line.push_str(assignments);
            line.push(' ');
        }
        line.push_str(
            &words
                .iter()
                .map(|w| w.text.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        );
        for r in redirects {
            line.push(' ');
            line.push_str(r);
        }
        self.commands.push(line.clone());
        if first.dynamic || first.pattern || first.text.is_empty() {
            self.raise(OperationClass::Exec);
            self.key("dynamic command");
            self.key(line);
            return Ok(vec![("?".into(), false)]);
        }
        // zsh expands a word `=cmd` to the program's path (`=sudo reboot` runs sudo).
        let program = first
            .text
            .strip_prefix('=')
            .filter(|p| !p.is_empty())
            .unwrap_or(&first.text);
        let name = basename(program).to_owned();
        self.key(name.clone());
        self.key(line.clone());
        if first.text.contains('/') && !is_system_path(&first.text) {
            // A program of its own (`./x`, `/tmp/ls`): whatever it is named, it runs code.
            self.raise(OperationClass::Exec);
            self.key("program from a path");
        }
        if words[1..]
            .iter()
            .any(|w| !w.dynamic && (w.text.contains("$(") || w.text.contains('`')))
        {
            // A substitution in quotes, which `eval`, arithmetic or a subscript may run later.
            self.raise(OperationClass::Exec);
            self.key("deferred substitution");
        }
        if let Some(sub) = args.iter().find(|a| !a.starts_with('-')) {
            self.key(format!("{name} {sub}"));
        }
        // Arguments of the form `rm -rf {/,x}` are expanded here for the checks below.
        let expanded: Vec<String> = words[1..]
            .iter()
            .flat_map(|w| {
                if w.pattern {
                    brace_alternatives(&w.text)
                } else {
                    vec![w.text.clone()]
                }
            })
            .collect();
        let args_x: Vec<&str> = expanded.iter().map(String::as_str).collect();
        if matches!(name.as_str(), "cd" | "chdir" | "pushd" | "popd") {
            self.change_dir(&name, &words[1..]);
        }
        let inner = |skip: usize| -> Vec<WordText> {
            words
                .get(1 + skip..)
                .map(<[WordText]>::to_vec)
                .unwrap_or_default()
        };
        use OperationClass::*;
        match name.as_str() {
            // Wrappers: the inner command is what runs.
            "sudo" | "doas" | "pkexec" | "run0" => {
                self.raise(Privilege);
                let skip = skip_options(
                    &args,
                    &[
                        "-u",
                        "-g",
                        "-C",
                        "-D",
                        "-p",
                        "-r",
                        "-t",
                        "-T",
                        "-U",
                        "-h",
                        "--user",
                        "--group",
                        "--chdir",
                        "--prompt",
                        "--role",
                        "--type",
                        "--close-from",
                        "--other-user",
                        "--host",
                    ],
                );
                let rest: Vec<WordText> = inner(skip)
                    .into_iter()
                    .skip_while(|w| is_assignment(&w.text))
                    .collect();
                if rest.is_empty() {
                    self.key("root shell");
                    return Ok(vec![(name, false)]);
                }
                return self.argv(&rest, "", &[], depth + 1);
            }
            "su" => {
                self.raise(Privilege);
                if let Some(i) = args.iter().position(|a| *a == "-c" || *a == "--command") {
                    if let Some(c) = args.get(i + 1) {
                        self.line(c, depth + 1)?;
                    }
                } else if let Some(c) = args.iter().find_map(|a| a.strip_prefix("--command=")) {
                    self.line(c, depth + 1)?;
                }
                return Ok(vec![(name, false)]);
            }
            "env" => {
                let mut i = 0;
                while i < args.len() {
                    let a = args[i];
                    if a == "--" {
                        i += 1;
                        break;
                    } else if a == "-S" || a == "--split-string" {
                        if let Some(s) = args.get(i + 1) {
                            self.line(s, depth + 1)?;
                        }
                        return Ok(Vec::new());
                    } else if let Some(s) = a
                        .strip_prefix("--split-string=")
                        .or_else(|| a.strip_prefix("-S").filter(|s| !s.is_empty()))
                    {
                        self.line(s, depth + 1)?;
                        return Ok(Vec::new());
                    } else if matches!(a, "-u" | "--unset" | "-C" | "--chdir") {
                        i += 2;
                    } else if a.starts_with('-') && !a.starts_with("--") && a.len() > 2 {
                        // A cluster of short flags: `-iS'cmd'`, `-iu NAME`.
                        let flags = &a[1..];
                        if let Some(pos) = flags.find('S') {
                            let rest = &flags[pos + 1..];
                            let split = if rest.is_empty() {
                                args.get(i + 1).copied().unwrap_or("")
                            } else {
                                rest
                            };
                            self.line(split, depth + 1)?;
                            return Ok(Vec::new());
                        }
                        i += if flags.ends_with(['u', 'C']) { 2 } else { 1 };
                    } else if is_assignment(a) {
                        // `env LD_PRELOAD=… id` sets what an assignment word would.
                        self.assignment(a);
                        i += 1;
                    } else if a.starts_with('-') {
                        i += 1;
                    } else {
                        break;
                    }
                }
                let rest = inner(i);
                if rest.is_empty() {
                    return Ok(Vec::new());
                }
                return self.argv(&rest, "", &[], depth + 1);
            }
            "nice" | "nohup" | "time" | "exec" | "command" | "builtin" | "stdbuf" | "ionice"
            | "setsid" | "busybox" | "chrt" | "taskset" | "unbuffer" | "caffeinate"
            | "doas-nice"
            // zsh's precommand modifiers and `repeat N cmd`.
            | "noglob" | "nocorrect" | "-" | "repeat" => {
                if name == "command" && args.iter().any(|a| *a == "-v" || *a == "-V") {
                    return Ok(Vec::new());
                }
                let with_values: &[&str] = match name.as_str() {
                    "nice" => &["-n", "--adjustment"],
                    "exec" => &["-a"],
                    "stdbuf" => &["-i", "-o", "-e"],
                    "ionice" => &["-c", "-n", "-p", "-P", "-u"],
                    "chrt" => &["-T", "-P", "-D"],
                    _ => &[],
                };
                let mut skip = skip_options(&args, with_values);
                if name == "-" {
                    skip = 0;
                } else if matches!(name.as_str(), "chrt" | "taskset" | "repeat") && skip < args.len()
                {
                    skip += 1; // the priority, the CPU mask or the count
                }
                let rest = inner(skip);
                if rest.is_empty() {
                    if name == "exec" {
                        self.raise(Exec);
                    }
                    return Ok(Vec::new());
                }
                return self.argv(&rest, "", &[], depth + 1);
            }
            "timeout" => {
                let skip = skip_options(&args, &["-s", "--signal", "-k", "--kill-after"]) + 1;
                return self.argv(&inner(skip), "", &[], depth + 1);
            }
            "flock" => {
                if let Some(i) = args.iter().position(|a| *a == "-c" || *a == "--command") {
                    if let Some(c) = args.get(i + 1) {
                        self.line(c, depth + 1)?;
                    }
                    return Ok(Vec::new());
                }
                let skip =
                    skip_options(&args, &["-w", "--timeout", "-E", "--conflict-exit-code"]) + 1;
                return self.argv(&inner(skip), "", &[], depth + 1);
            }
            "chroot" => {
                self.raise(Admin);
                let skip = skip_options(&args, &["--userspec", "--groups"]) + 1;
                let rest = inner(skip);
                if !rest.is_empty() {
                    self.argv(&rest, "", &[], depth + 1)?;
                }
                return Ok(Vec::new());
            }
            "xargs" => {
                let skip = skip_options(
                    &args,
                    &[
                        "-I",
                        "-L",
                        "-n",
                        "-P",
                        "-s",
                        "-d",
                        "-E",
                        "-a",
                        "--max-args",
                        "--max-procs",
                        "--delimiter",
                        "--arg-file",
                        "--max-lines",
                        "--max-chars",
                        "--replace",
                        "--eof",
                    ],
                );
                let mut rest = inner(skip);
                self.raise(Write);
                if rest.is_empty() {
                    return Ok(Vec::new());
                }
                // The arguments come from stdin: names known only on the host, in the
                // words holding the replace string (`-I{}`), else after the last word.
                let replace = args.iter().enumerate().find_map(|(i, a)| {
                    if *a == "-I" {
                        args.get(i + 1).map(|v| (*v).to_owned())
                    } else if let Some(v) = a.strip_prefix("--replace=") {
                        Some(v.to_owned())
                    } else if *a == "-i" || *a == "--replace" {
                        Some("{}".to_owned())
                    } else {
                        a.strip_prefix("-I").or_else(|| a.strip_prefix("-i")).filter(|v| !v.is_empty()).map(str::to_owned)
                    }
                });
                match replace {
                    Some(r) if !r.is_empty() => {
                        for w in rest.iter_mut().skip(1) {
                            if w.text.contains(r.as_str()) {
                                w.dynamic = true;
                            }
                        }
                    }
                    _ => rest.push(WordText {
                        text: "{xargs input}".to_owned(),
                        dynamic: true,
                        pattern: false,
                    }),
                }
                return self.argv(&rest, "", &[], depth + 1);
            }
            "watch" => {
                let skip = skip_options(
                    &args,
                    &["-n", "--interval", "-d", "--differences", "-q", "--equexit"],
                );
                let rest = args.get(skip..).unwrap_or(&[]).join(" ");
                if !rest.is_empty() {
                    self.line(&rest, depth + 1)?;
                }
                return Ok(Vec::new());
            }
            "find" => {
                // Where it starts: `{}` in an -exec stands for these (and everything below).
                let starts: Vec<&str> = args
                    .iter()
                    .copied()
                    .take_while(|a| !a.starts_with('-') && *a != "(" && *a != "!")
                    .collect();
                let start = starts
                    .iter()
                    .copied()
                    .find(|s| self.root_path(s))
                    .or(starts.first().copied())
                    .unwrap_or(".")
                    .to_owned();
                let start_path = start;
                let mut i = 0;
                while i < args.len() {
                    match args[i] {
                        "-exec" | "-execdir" | "-ok" | "-okdir" => {
                            let start = i + 1;
                            let mut end = start;
                            while end < args.len() && args[end] != ";" && args[end] != "+" {
                                end += 1;
                            }
                            let sub: Vec<WordText> = words
                                .get(1 + start..1 + end)
                                .map(<[WordText]>::to_vec)
                                .unwrap_or_default()
                                .into_iter()
                                .map(|mut w| {
                                    // What is found under the start: its names are known
                                    // only on the host.
                                    if w.text.contains("{}") {
                                        w.text = w.text.replace("{}", &start_path);
                                        w.dynamic = true;
                                    }
                                    w
                                })
                                .collect();
                            if !sub.is_empty() {
                                self.argv(&sub, "", &[], depth + 1)?;
                            }
                            i = end + 1;
                        }
                        "-delete" => {
                            if self.root_path(&start_path) {
                                self.raise(Admin);
                                self.key("rm -rf /");
                            }
                            self.raise(Write);
                            i += 1;
                        }
                        "-fprint" | "-fprint0" | "-fprintf" | "-fls" => {
                            self.raise(Write);
                            if let Some(f) = words.get(i + 2) {
                                let f = f.clone();
                                self.written(&f);
                            }
                            i += 2;
                        }
                        _ => i += 1,
                    }
                }
                return Ok(vec![(name, false)]);
            }
            "eval" => {
                self.raise(Exec);
                let text = args.join(" ");
                if !text.trim().is_empty() {
                    self.line(&text, depth + 1)?;
                }
                if words[1..].iter().any(|w| w.dynamic) {
                    self.key("dynamic command");
                }
                return Ok(Vec::new());
            }
            "source" | "." => {
                self.raise(Exec);
                return Ok(vec![(name, false)]);
            }
            _ => {}
        }
        if SHELLS.contains(&name.as_str()) {
            self.raise(Exec);
            let skip = skip_options(&args, &["-o", "+o", "-O", "+O", "--rcfile", "--init-file"]);
            if let Some(i) = args
                .iter()
                .position(|a| a.starts_with('-') && !a.starts_with("--") && a.contains('c'))
            {
                if let Some(c) = args.get(i + 1) {
                    if words.get(i + 2).is_some_and(|w| w.dynamic)
                        && DOWNLOADERS.iter().any(|d| c.contains(d))
                    {
                        self.raise(Admin);
                        self.key("curl | sh");
                    }
                    self.line(c, depth + 1)?;
                }
                return Ok(vec![(name, false)]);
            }
            // A script (runs unseen) or stdin (a pipe, a here-document).
            let reads_stdin =
                skip >= args.len() || args.contains(&"-s") || args.get(skip) == Some(&"-");
            return Ok(vec![(name, reads_stdin)]);
        }
        if let Some(class) = self.side_effects(&name, &words[1..]) {
            self.raise(class);
            return Ok(vec![(name, false)]);
        }
        if RUNS_CODE.contains(&name.as_str()) {
            // `export`/`declare` only when they set something that runs code.
            if matches!(name.as_str(), "declare" | "typeset" | "export" | "readonly") {
                for a in args.iter().filter(|a| a.contains('=')) {
                    self.assignment(a);
                }
                if !args
                    .iter()
                    .any(|a| a.starts_with('-') && (a.contains('f') || a.contains('n')))
                {
                    return Ok(vec![(name, false)]);
                }
            }
            self.raise(Exec);
            self.key("runs code");
            if !RUNS_CODE_NOT_ARGV.contains(&name.as_str()) {
                self.wrapped(&words[1..], depth)?;
            }
            return Ok(vec![(name, false)]);
        }
        if matches!(name.as_str(), "sudoedit" | "runuser") {
            self.raise(Privilege);
            return Ok(vec![(name, false)]);
        }
        if matches!(
            name.as_str(),
            "printf" | "read" | "test" | "[" | "mapfile" | "readarray"
        ) && args.iter().any(|a| a.contains('['))
            && (name != "printf" || args.contains(&"-v"))
        {
            // A subscript evaluated as arithmetic (`read 'a[$(cmd)]'`).
            self.raise(Exec);
            self.key("deferred substitution");
        }
        if SHELL_ESCAPES.contains(&name.as_str()) {
            // Editors, pagers and consoles that run commands typed into them.
            self.raise(Exec);
            self.key("shell escape");
            return Ok(vec![(name, false)]);
        }
        if is_interpreter(&name) {
            self.raise(Exec);
            let reads_stdin = args.is_empty() || args == ["-"];
            return Ok(vec![(name, reads_stdin)]);
        }
        let sub = args
            .iter()
            .copied()
            .find(|a| !a.starts_with('-'))
            .unwrap_or("");
        let has = |flag: &str| args.contains(&flag);
        let class = match name.as_str() {
            "rm" => {
                let recursive = args.iter().any(|a| {
                    *a == "--recursive"
                        || (a.starts_with('-')
                            && !a.starts_with("--")
                            && (a.contains('r') || a.contains('R')))
                });
                if recursive && args_x.iter().any(|a| self.root_path(a))
                    || has("--no-preserve-root")
                {
                    self.key("rm -rf /");
                    Admin
                } else if recursive && words[1..].iter().any(|w| w.dynamic) {
                    // `rm -rf $d`: what it removes is known only on the host.
                    self.key("dynamic command");
                    Exec
                } else {
                    Write
                }
            }
            "shred" | "wipefs" if args_x.iter().any(|a| is_device(a)) => Admin,
            // Options that run a program, however written: `-Izstd`, `-xI prog`, `--use-comp=`,
            // and in the old style without a dash (`tar xIf prog a.tar`).
            "tar"
                if effects::flag(&args, Some('I'), Some("use-compress-program"), 5)
                    || effects::flag(&args, Some('F'), Some("info-script"), 3)
                    || effects::flag(&args, None, Some("new-volume-script"), 3)
                    || effects::flag(&args, None, Some("to-command"), 4)
                    || effects::flag(&args, None, Some("checkpoint-action"), 12)
                    || effects::flag(&args, None, Some("rsh-command"), 3)
                    || args
                        .first()
                        .is_some_and(|a| !a.starts_with('-') && a.contains(['I', 'F'])) =>
            {
                self.key("runs a program");
                Exec
            }
            // A remote shell command, a config file or a program of the agent's choosing.
            "scp" | "sftp"
                if args.iter().any(|a| {
                    ["-o", "-S", "-F"].iter().any(|o| a.starts_with(o))
                        || (a.starts_with('-')
                            && !a.starts_with("--")
                            && a[1..].contains(['o', 'S', 'F']))
                }) =>
            {
                Exec
            }
            // A makefile from stdin, or text evaluated as one.
            "make" | "gmake"
                if args
                    .windows(2)
                    .any(|w| matches!(w[0], "-f" | "--file" | "--makefile") && w[1] == "-")
                    || args.iter().any(|a| {
                        a.starts_with("--eval")
                            || a.starts_with("-E")
                            || matches!(*a, "-f-" | "--file=-" | "--makefile=-")
                    }) =>
            {
                Exec
            }
            "zip"
                if args
                    .iter()
                    .any(|a| *a == "-T" || *a == "-TT" || a.starts_with("--unzip-command")) =>
            {
                Exec
            }
            "git"
                if args.iter().any(|a| {
                    *a == "-c"
                        || a.starts_with("--exec-path")
                        || a.starts_with("--config-env")
                        || *a == "-O"
                        || a.starts_with("--open-files-in-pager")
                }) || (args.contains(&"config") && args.iter().any(|a| git_code_key(a))) =>
            {
                Exec
            }
            // Read subcommands that write a file anyway.
            "git" if args.iter().any(|a| a.starts_with("--output")) => Write,
            "tee" => {
                for a in args_x.iter().filter(|a| !a.starts_with('-')) {
                    self.written(&WordText {
                        text: (*a).to_owned(),
                        ..Default::default()
                    });
                }
                Write
            }
            "chmod" => {
                if args.iter().any(|a| is_setid_mode(a)) {
                    self.key("setuid");
                    Privilege
                } else {
                    Write
                }
            }
            "chown" | "chgrp" | "passwd" | "chpasswd" | "useradd" | "usermod" | "userdel"
            | "adduser" | "deluser" | "groupadd" | "groupmod" | "groupdel" | "gpasswd"
            | "visudo" | "setcap" | "newgrp" | "sg" | "vipw" | "vigr" | "chage" => Privilege,
            "shutdown" | "reboot" | "halt" | "poweroff" | "mkswap" | "fdisk" | "sfdisk"
            | "gdisk" | "parted" | "wipefs" | "iptables" | "ip6tables" | "nft" | "ufw"
            | "firewall-cmd" | "modprobe" | "insmod" | "rmmod" | "swapoff" | "swapon" | "kexec"
            | "mke2fs" | "pivot_root" | "losetup" | "cryptsetup" | "lvremove" | "vgremove"
            | "pvremove" | "mdadm" => Admin,
            n if n.starts_with("mkfs") => Admin,
            "init" | "telinit" => {
                if args
                    .iter()
                    .any(|a| matches!(*a, "0" | "6" | "1" | "s" | "S"))
                {
                    Admin
                } else {
                    Read
                }
            }
            "systemctl" => match sub {
                "" | "status" | "show" | "cat" | "help" | "is-active" | "is-enabled"
                | "is-failed" | "is-system-running" | "list-units" | "list-unit-files"
                | "list-timers" | "list-sockets" | "list-dependencies" | "list-jobs"
                | "get-default" => Read,
                "poweroff" | "reboot" | "halt" | "kexec" | "isolate" | "emergency" | "rescue"
                | "suspend" | "hibernate" | "hybrid-sleep" | "soft-reboot" | "set-default"
                | "switch-root" => Admin,
                // Opens an editor, whose own commands run programs.
                "edit" => Exec,
                _ => Ddl,
            },
            "service" => {
                if args.get(1).is_some_and(|a| *a == "status") || has("--status-all") {
                    Read
                } else {
                    Ddl
                }
            }
            "mount" | "umount" => {
                if args.is_empty() {
                    Read
                } else {
                    Admin
                }
            }
            "sysctl" => {
                if has("-w") || has("--write") || has("-p") || args.iter().any(|a| a.contains('='))
                {
                    Admin
                } else {
                    Read
                }
            }
            "ip" => {
                if args.iter().any(|a| {
                    matches!(
                        *a,
                        "add"
                            | "del"
                            | "delete"
                            | "set"
                            | "flush"
                            | "change"
                            | "replace"
                            | "append"
                            | "prepend"
                            | "exec"
                    )
                }) {
                    Admin
                } else {
                    Read
                }
            }
            "kill" | "pkill" | "killall" => {
                let targets_init = args
                    .iter()
                    .any(|a| matches!(*a, "1" | "-1" | "init" | "systemd" | "sshd"));
                if targets_init { Admin } else { Write }
            }
            "apt" | "apt-get" | "aptitude" => {
                if matches!(
                    sub,
                    "list" | "show" | "search" | "policy" | "depends" | "rdepends" | "changelog"
                ) {
                    Read
                } else {
                    Ddl
                }
            }
            "apt-cache" => Read,
            "dpkg" => {
                if args.iter().any(|a| {
                    matches!(
                        *a,
                        "-l" | "-L"
                            | "-s"
                            | "-S"
                            | "--list"
                            | "--listfiles"
                            | "--status"
                            | "--search"
                            | "--get-selections"
                            | "--print-architecture"
                    )
                }) {
                    Read
                } else {
                    Ddl
                }
            }
            "rpm" => {
                if args
                    .first()
                    .is_some_and(|a| a.starts_with("-q") || *a == "--query")
                {
                    Read
                } else {
                    Ddl
                }
            }
            "yum" | "dnf" | "zypper" | "pacman" | "apk" | "snap" | "flatpak" | "brew" | "port"
            | "emerge" => {
                if matches!(sub, "list" | "info" | "search" | "show" | "query") || has("-Q") {
                    Read
                } else {
                    Ddl
                }
            }
            "pip" | "pip3" | "pipx" | "gem" | "cargo" | "go" | "conda" => {
                if matches!(
                    sub,
                    "install" | "uninstall" | "remove" | "update" | "upgrade"
                ) {
                    Ddl
                } else if matches!(
                    sub,
                    "list" | "show" | "freeze" | "search" | "version" | "env" | "doctor"
                ) {
                    Read
                } else {
                    Write
                }
            }
            "npm" | "yarn" | "pnpm" => {
                if has("-g") || has("--global") {
                    Ddl
                } else {
                    Write
                }
            }
            "crontab" => {
                if has("-l") {
                    Read
                } else if has("-e") {
                    // Opens an editor, whose own commands run programs.
                    Exec
                } else {
                    Ddl
                }
            }
            // Opening an editor: its own commands (`:!cmd`, `:term`) run programs, and the
            // lines typed into it are not shell commands.
            "git"
                if matches!(sub, "commit" | "merge" | "tag" | "rebase")
                    && (has("-i")
                        || has("--interactive")
                        || has("-e")
                        || has("--edit")
                        || (sub == "commit"
                            && !args.iter().any(|a| {
                                a.starts_with("-m")
                                    || a.starts_with("--message")
                                    || a.starts_with("-F")
                                    || a.starts_with("--file")
                                    || a.starts_with("-C")
                                    || a.starts_with("--reuse-message")
                                    || *a == "--no-edit"
                                    || a.starts_with("--fixup")
                            }))) =>
            {
                Exec
            }
            "journalctl" if args.iter().any(|a| journal_write_option(a)) => Write,
            "docker" | "podman" | "nerdctl" | "crictl" | "ctr" => match sub {
                "ps" | "images" | "logs" | "inspect" | "version" | "info" | "stats" | "top"
                | "history" | "events" => Read,
                "exec" | "attach" => Exec,
                _ => Ddl,
            },
            "kubectl" | "oc" | "helm" => match sub {
                "get" | "describe" | "logs" | "explain" | "version" | "api-resources"
                | "api-versions" | "top" | "auth" | "cluster-info" | "list" | "status"
                | "history" | "show" | "search" => Read,
                "exec" | "attach" | "port-forward" | "proxy" | "debug" | "cp" => Exec,
                _ => Ddl,
            },
            "git" => match sub {
                "status" | "log" | "diff" | "show" | "rev-parse" | "ls-files" | "ls-tree"
                | "blame" | "grep" | "describe" | "shortlog" | "reflog" | "cat-file"
                | "rev-list" | "whatchanged" => Read,
                "branch" | "tag" | "remote" | "stash"
                    if args.len() == 1
                        || args.iter().skip(1).all(|a| {
                            matches!(*a, "-v" | "-vv" | "-a" | "-r" | "--list" | "-l")
                        }) =>
                {
                    Read
                }
                "config"
                    if args
                        .iter()
                        .any(|a| matches!(*a, "--get" | "--list" | "-l" | "--get-all")) =>
                {
                    Read
                }
                _ => Write,
            },
            "awk" | "gawk" | "mawk" | "nawk" => {
                if args.iter().any(|a| {
                    a.contains("system") || a.contains('|') || a.contains("> ") || a.contains(">\"")
                }) || args.iter().any(|a| {
                    a.starts_with("-f")
                        || a.starts_with("--file")
                        || a.starts_with("-E")
                        || a.starts_with("--exec")
                }) {
                    Exec
                } else {
                    Read
                }
            }
            "ssh" | "nc" | "ncat" | "netcat" | "socat" | "telnet" | "ftp" => Exec,
            "ls" | "cat" | "head" | "tail" | "grep" | "egrep" | "fgrep" | "rg" | "ag" | "stat"
            | "file" | "wc" | "du" | "df" | "free" | "uptime" | "whoami" | "id" | "hostname"
            | "uname" | "date" | "echo" | "printf" | "pwd" | "ps" | "top" | "htop" | "pgrep"
            | "lsof" | "ss" | "netstat" | "printenv" | "which" | "type" | "true" | "false"
            | "test" | "[" | "sort" | "uniq" | "cut" | "tr" | "jq" | "yq" | "diff" | "cmp"
            | "md5sum" | "sha1sum" | "sha256sum" | "sha512sum" | "base64" | "journalctl"
            | "dmesg" | "lsblk" | "blkid" | "cd" | "tree" | "basename" | "dirname" | "realpath"
            | "readlink" | "sleep" | "history" | "column" | "nl" | "tac" | "rev" | "fold"
            | "fmt" | "paste" | "join" | "comm" | "expand" | "unexpand" | "od" | "xxd"
            | "hexdump" | "strings" | "zcat" | "zgrep" | "bzcat" | "xzcat" | "lscpu" | "lsmod"
            | "lspci" | "lsusb" | "nproc" | "getent" | "groups" | "who" | "w" | "last"
            | "finger" | "locale" | "tty" | "seq" | "yes" | "expr" | "bc" | "cal" | "env"
            | "nslookup" | "dig" | "host" | "ping" | "traceroute" | "tracepath" | "mtr"
            | "vmstat" | "iostat" | "mpstat" | "sar" | "pidof" | "timedatectl" | "hostnamectl"
            | "localectl" | "loginctl" | "whereis" | "apropos" | "info" | "exit" | "logout"
            | "clear" | "reset" | "set" | "unset" | "read" | "shift" | "return" | "break"
            | "continue" | "wait" | "jobs" | "fg" | "bg" | "ulimit" | "umask" | "shopt"
            | "local" | ":" | "getconf" | "tput" | "sum" | "cksum" | "look" | "tsort"
            | "numfmt" | "factor" | "pr" | "iconv" => Read,
            n if KNOWN_WRITERS.contains(&n) => Write,
            // A program agentgate does not know: it changes files, and it may run another.
            _ => {
                self.wrapped(&words[1..], depth)?;
                self.unknown_outputs(&args);
                Write
            }
        };
        self.raise(class);
        Ok(vec![(name, false)])
    }
}

/// Whether a `git config` argument names a setting whose value git runs (an alias with `!`,
/// a pager, editor, hook path, external diff, filter, credential helper, ssh command…).
fn git_code_key(a: &str) -> bool {
    let a = a.to_ascii_lowercase();
    a.starts_with("alias.")
        || a.starts_with("filter.")
        || a.starts_with("credential")
        || a.starts_with("core.pager")
        || a.starts_with("core.editor")
        || a.starts_with("core.fsmonitor")
        || a.starts_with("core.sshcommand")
        || a.starts_with("core.hookspath")
        || a.starts_with("core.askpass")
        || a.starts_with("core.gitproxy")
        || a.starts_with("diff.external")
        || a.starts_with("sequence.editor")
        || a.starts_with("gpg.")
        || a.starts_with("pager.")
        || a.starts_with("include")
        || a.contains(".textconv")
        || a.contains(".command")
        || a.contains(".cmd")
        || a.contains(".tool")
        || a == "--edit"
        || a == "-e"
        || a.starts_with("--file")
}

fn is_assignment(s: &str) -> bool {
    s.split_once('=').is_some_and(|(k, _)| {
        !k.is_empty()
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !k.starts_with(|c: char| c.is_ascii_digit())
    })
}

/// How many leading arguments are options (with the values of those in `with_value`).
fn skip_options(args: &[&str], with_value: &[&str]) -> usize {
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        if a == "--" {
            return i + 1;
        }
        if !a.starts_with('-') || a == "-" {
            return i;
        }
        if with_value.contains(&a) {
            i += 2;
        } else {
            i += 1;
        }
    }
    i
}

/// `/`, `/*`, `~`, `$HOME`, or one top-level directory (`/etc`, `/usr/*`), however spelled.
fn is_root_path(p: &str) -> bool {
    let p = p.trim();
    if matches!(
        p,
        "~" | "~/"
            | "~/*"
            | "$HOME"
            | "${HOME}"
            | "$HOME/"
            | "$HOME/*"
            | "${HOME}/"
            | "${HOME}/*"
            | "*"
            | ".*"
            | "./*"
            | "./.*"
            | "/*/*"
    ) {
        return true;
    }
    if !p.starts_with('/') {
        return false;
    }
    // Normalized (`//`, `.`, `..` resolved), a trailing `*` dropped: at most one component.
    let n = normalize_path(p);
    let n = n.strip_suffix("/*").unwrap_or(&n);
    n.split('/').filter(|s| !s.is_empty()).count() <= 1
}

fn is_device(p: &str) -> bool {
    let Some(dev) = p.strip_prefix("/dev/") else {
        return false;
    };
    [
        "sd", "nvme", "vd", "xvd", "hd", "mmcblk", "dm-", "md", "loop", "mem", "kmem", "port",
        "disk/", "mapper/", "sr", "nbd", "root", "ram", "rbd", "zd", "mtd",
    ]
    .iter()
    .any(|d| dev.starts_with(d))
}

/// The class of writing the file at `p` (normalized): `Admin` for devices and kernel
/// triggers, `Privilege` for account, sudo, cron and login-startup files, `Write` otherwise.
pub fn write_class(p: &str) -> OperationClass {
    if is_device(p) || p.starts_with("/proc/sys") || p == "/proc/sysrq-trigger" {
        OperationClass::Admin
    } else if is_privileged_file(p) {
        OperationClass::Privilege
    } else {
        OperationClass::Write
    }
}

fn w_pattern(w: Option<&WordText>) -> bool {
    w.is_some_and(|w| w.pattern)
}

/// The class of writing a file that may land at any of `paths` (relative ones in the login's
/// home directory, where an upload starts), with a setuid or setgid mode (`setid`): the
/// most severe of them.
pub fn landing_class(paths: &[String], setid: bool) -> OperationClass {
    let mut worst = if setid {
        OperationClass::Privilege
    } else {
        OperationClass::Write
    };
    for p in paths {
        let mut classes = vec![write_class(&normalize_path(p))];
        if !p.starts_with(['/', '~']) {
            // Climbing out of the home directory leads somewhere not known.
            classes.push(join_dir("~", p).map_or(OperationClass::Privilege, |j| write_class(&j)));
        }
        for c in classes {
            if severity(c) > severity(worst) {
                worst = c;
            }
        }
    }
    worst
}

/// A path with `//`, `/./` and `..` resolved (relative paths keep their start).
pub fn normalize_path(p: &str) -> String {
    if !p.starts_with('/') {
        return p.to_owned();
    }
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

fn is_system_path(p: &str) -> bool {
    let n = normalize_path(p);
    [
        "/bin/",
        "/usr/bin/",
        "/sbin/",
        "/usr/sbin/",
        "/usr/local/bin/",
        "/usr/local/sbin/",
    ]
    .iter()
    .any(|d| n.starts_with(d) && !n[d.len()..].contains('/'))
}

fn is_privileged_file(p: &str) -> bool {
    let home_startup = [
        "/.bashrc",
        "/.bash_profile",
        "/.bash_login",
        "/.bash_logout",
        "/.profile",
        "/.zshrc",
        "/.zprofile",
        "/.zshenv",
        "/.ssh/rc",
        "/.ssh/environment",
        "/.ssh/config",
        "/.inputrc",
    ];
    if home_startup.iter().any(|f| p.ends_with(f))
        || p.starts_with("~/.") && home_startup.iter().any(|f| p[1..] == **f)
    {
        return true;
    }
    // A relative path is wherever the shell is (`echo x >> .bashrc` in the home directory,
    // `../../etc/sudoers.d/x`): startup files are known by their name alone, and a path
    // that climbs with `..` could be anything.
    let base = basename(p);
    if matches!(
        base,
        ".bashrc"
            | ".bash_profile"
            | ".bash_login"
            | ".bash_logout"
            | ".bash_aliases"
            | ".profile"
            | ".zshrc"
            | ".zprofile"
            | ".zshenv"
            | ".zlogin"
            | ".inputrc"
            | ".gitconfig"
            | ".pam_environment"
            | ".curlrc"
            | ".wgetrc"
            | ".npmrc"
            | ".pythonrc"
            | "authorized_keys"
            | "authorized_keys2"
    ) || (!p.starts_with('/') && p.split('/').any(|s| s == ".."))
    {
        return true;
    }
    if p.starts_with("/etc/cron")
        || p.starts_with("/var/spool/cron")
        || p.starts_with("/etc/profile")
        || p.starts_with("/etc/bash")
        || p.starts_with("/etc/systemd")
        || p.starts_with("/etc/init.d")
        || p.starts_with("/etc/security")
        || matches!(
            p,
            "/etc/environment" | "/etc/ld.so.preload" | "/etc/ld.so.conf" | "/etc/rc.local"
        )
    {
        return true;
    }
    p.starts_with("/etc/sudoers")
        || matches!(
            p,
            "/etc/passwd" | "/etc/shadow" | "/etc/group" | "/etc/gshadow"
        )
        || p.ends_with("/authorized_keys")
        || p.ends_with("/authorized_keys2")
        || p.starts_with("/etc/pam.d")
        || p.starts_with("/etc/ssh/")
}

fn is_setid_mode(m: &str) -> bool {
    if !m.is_empty() && m.chars().all(|c| c.is_ascii_digit()) {
        return u32::from_str_radix(m, 8).is_ok_and(|v| v & 0o6000 != 0);
    }
    m.split(',').any(|clause| {
        clause
            .split_once(['+', '='])
            .is_some_and(|(_, perms)| perms.contains('s'))
    })
}

/// The words one brace expression stands for (`{/,x}` → `/`, `x`; `a{b,c}d` → `abd`, `acd`);
/// the text itself when it has none.
fn brace_alternatives(text: &str) -> Vec<String> {
    let (Some(open), Some(close)) = (text.find('{'), text.rfind('}')) else {
        return vec![text.to_owned()];
    };
    if close < open {
        return vec![text.to_owned()];
    }
    let (pre, inner, post) = (&text[..open], &text[open + 1..close], &text[close + 1..]);
    if !inner.contains(',') {
        return vec![text.to_owned()];
    }
    let mut out: Vec<String> = inner
        .split(',')
        .map(|alt| format!("{pre}{alt}{post}"))
        .collect();
    out.push(text.to_owned());
    out
}

/// Decodes the escapes of `$'…'`.
fn ansi_c(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('e' | 'E') => out.push('\u{1b}'),
            Some('x') => {
                let mut hex = String::new();
                while hex.len() < 2 && chars.peek().is_some_and(char::is_ascii_hexdigit) {
                    hex.extend(chars.next());
                }
                if let Some(c) = u8::from_str_radix(&hex, 16).ok().map(char::from) {
                    out.push(c);
                }
            }
            Some(d @ '0'..='7') => {
                let mut oct = String::from(d);
                while oct.len() < 3 && chars.peek().is_some_and(|c| ('0'..='7').contains(c)) {
                    oct.extend(chars.next());
                }
                if let Some(c) = u8::from_str_radix(&oct, 8).ok().map(char::from) {
                    out.push(c);
                }
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests;

mod effects;
mod sed;
mod writers;

pub use writers::{hardlink_class, rename_class, symlink_class};
