//! `*` globs, the only pattern syntax of agentgate's manifests.

/// Whether `pattern` matches all of `text`; `*` matches any run of characters (also none).
pub fn matches(pattern: &str, text: &str) -> bool {
    wildcard(pattern.as_bytes(), text.as_bytes(), |a, b| a == b)
}

/// [`matches`], ignoring ASCII case (for SQL keywords).
pub fn matches_ci(pattern: &str, text: &str) -> bool {
    wildcard(pattern.as_bytes(), text.as_bytes(), |a, b| {
        a.eq_ignore_ascii_case(&b)
    })
}

/// Whether an `ssh.commands` pattern allows a command line (words joined by one space).
/// A `*` standing alone as a word (`journalctl *`, `git * --oneline`) matches any run of
/// arguments; a `*` inside a word (`cat /srv/reports/*`) matches literal text within that
/// one argument only: never a blank (`cat /srv/reports/a /etc/shadow` has two arguments),
/// never a `..` path segment or a hidden-name glob that may match one
/// (`cat /srv/reports/../../etc/shadow`, `/srv/reports/.*/x`), and never an expansion
/// (`cat /srv/reports/$X`); only the pattern's own literal text matches those.
pub fn matches_command(pattern: &str, text: &str) -> bool {
    let p = command_pattern(pattern);
    let t = dotdot_marked(text);
    // A set of pattern positions (one bit each) run over the text: linear in the text for
    // a given pattern, and only the positions reached are visited.
    let n = p.len();
    let words = n / 64 + 1;
    let set = |s: &mut [u64], i: usize| s[i / 64] |= 1 << (i % 64);
    let has = |s: &[u64], i: usize| s[i / 64] & (1 << (i % 64)) != 0;
    let positions = |s: &[u64]| -> Vec<usize> {
        let mut out = Vec::new();
        for (w, bits) in s.iter().enumerate() {
            let mut b = *bits;
            while b != 0 {
                out.push(w * 64 + b.trailing_zeros() as usize);
                b &= b - 1;
            }
        }
        out
    };
    // A star matches nothing too: from its position the next is reached at once (runs of
    // stars are one element, so one step is enough).
    let close = |s: &mut Vec<u64>| {
        for i in positions(s) {
            if i < n && matches!(p[i], Tok::AnyArgs | Tok::InWord) {
                set(s, i + 1);
            }
        }
    };
    let mut state = vec![0u64; words];
    set(&mut state, 0);
    close(&mut state);
    let mut next = vec![0u64; words];
    for &c in &t {
        next.iter_mut().for_each(|w| *w = 0);
        let mut any = false;
        for i in positions(&state) {
            let Some(tok) = p.get(i) else { continue };
            let to = match *tok {
                Tok::Lit(l) if l == c => i + 1,
                Tok::AnyArgs => i,
                // Within one argument, literal text only: no blank, no `..`, and no
                // expansion (`$X`, `` `cmd` ``), whose value could be anything.
                Tok::InWord if !c.is_whitespace() && !matches!(c, DOTDOT | '$' | '`') => i,
                _ => continue,
            };
            set(&mut next, to);
            any = true;
        }
        if !any {
            return false;
        }
        close(&mut next);
        std::mem::swap(&mut state, &mut next);
    }
    has(&state, n)
}

/// One element of a command pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// A character, as itself.
    Lit(char),
    /// A `*` that is a word of its own: any run of characters.
    AnyArgs,
    /// A `*` inside a word: a run within one argument.
    InWord,
}

/// Stands for a `..` path segment (the text is UTF-8 without NUL: commands with control
/// bytes are refused before they are matched).
const DOTDOT: char = '\u{0}';

/// Whether `c` ends a path segment on its left (`/a`, `x=a`, `host:a`, `{a,b}`).
fn segment_start(c: char) -> bool {
    matches!(c, '/' | '=' | ':' | ',' | '{') || c.is_whitespace()
}

/// Whether `c` ends a path segment on its right.
fn segment_end(c: char) -> bool {
    matches!(c, '/' | ',' | '}') || c.is_whitespace()
}

/// `text` as characters, with what may climb out of a directory marked by [`DOTDOT`]: each
/// `..` path segment is replaced by it, and it is put before a segment that starts with `.`
/// and holds a glob character (`.*`, `.?`, `.[.]` match `..` in a bash without
/// `globskipdots`).
fn dotdot_marked(text: &str) -> Vec<char> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        let starts = i == 0 || segment_start(chars[i - 1]);
        if starts && chars[i] == '.' {
            let end = chars[i..]
                .iter()
                .position(|c| segment_end(*c))
                .map_or(chars.len(), |n| i + n);
            let segment = &chars[i..end];
            if segment == ['.', '.'] {
                out.push(DOTDOT);
                i = end;
                continue;
            }
            if segment.iter().any(|c| matches!(c, '*' | '?' | '[')) {
                out.push(DOTDOT);
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// A command pattern's elements: each run of `*` one star, alone as a word or inside one;
/// `..` path segments marked as in [`dotdot_marked`] (a pattern names them literally).
fn command_pattern(pattern: &str) -> Vec<Tok> {
    let marked = dotdot_marked(pattern);
    let mut out = Vec::with_capacity(marked.len());
    let mut i = 0;
    while i < marked.len() {
        if marked[i] != '*' {
            out.push(Tok::Lit(marked[i]));
            i += 1;
            continue;
        }
        let start = i;
        while marked.get(i) == Some(&'*') {
            i += 1;
        }
        let alone =
            (start == 0 || marked[start - 1] == ' ') && marked.get(i).is_none_or(|c| *c == ' ');
        out.push(if alone { Tok::AnyArgs } else { Tok::InWord });
    }
    out
}

/// Iterative wildcard matching with one backtrack point: linear in practice, never
/// exponential, and without allocating (it runs for every guardrail on every statement).
///
/// Bytes, not characters: both are UTF-8, so a literal matches the same bytes either way, and
/// a match can never start inside a character of `text` (a continuation byte equals no
/// first byte of a pattern's character).
fn wildcard(p: &[u8], t: &[u8], eq: impl Fn(u8, u8) -> bool) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some(pi);
                mark = ti;
                pi += 1;
            }
            Some(&c) if eq(c, t[ti]) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some(s) => {
                    pi = s + 1;
                    mark += 1;
                    ti = mark;
                }
                None => return false,
            },
        }
    }
    while p.get(pi) == Some(&b'*') {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(matches("*", ""));
        assert!(matches("public.*", "public.orders"));
        assert!(!matches("public.*", "billing.orders"));
        assert!(matches("*.email", "public.customers.email"));
        assert!(matches("billing.invoice_*", "billing.invoice_2024"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "axxbyy"));
        assert!(matches("orders", "orders"));
        assert!(!matches("orders", "orders2"));
        assert!(matches_ci("drop *", "DROP TABLE"));
        assert!(matches_ci("curl * | sh", "curl https://x | sh"));
        // No blow-up on adversarial input.
        let long = "a".repeat(10_000);
        assert!(!matches("*a*a*a*a*a*a*a*b", &long));
        // Characters beyond ASCII match as themselves, and case folding is ASCII only.
        assert!(matches("*é*", "café au lait"));
        assert!(matches("caf?", "caf?"));
        assert!(!matches("é", "e"));
        assert!(matches_ci("SELECT * FROM ÉTÉ", "select x from ÉTÉ"));
        assert!(!matches_ci("été", "ÉTÉ"));
    }

    #[test]
    fn command_patterns_keep_a_star_in_its_argument() {
        for (pattern, text) in [
            ("systemctl status *", "systemctl status nginx"),
            ("systemctl status *", "systemctl status nginx postgresql"),
            ("journalctl *", "journalctl -u nginx --since today"),
            ("git * --oneline", "git log -5 --oneline"),
            ("cat /srv/reports/*", "cat /srv/reports/2024/q1.csv"),
            ("cat /srv/reports/*.csv", "cat /srv/reports/q1.csv"),
            ("sftp get /srv/reports/*", "sftp get /srv/reports/a.txt"),
            ("cat *", "cat ../../etc/shadow"),
            ("ls", "ls"),
            ("*", "anything at all ../.."),
            ("cat ../notes/*", "cat ../notes/a"),
            ("echo a..b*", "echo a..bc"),
            ("cat /srv/x/*", "cat /srv/x/a..b"),
            ("cat /srv/x/*", "cat /srv/x/.hidden"),
            ("cat /srv/x/*", "cat /srv/x/{a,b}.txt"),
            ("cat /srv/x/.*", "cat /srv/x/.*"),
            ("cat $HOME/*", "cat $HOME/notes"),
        ] {
            assert!(matches_command(pattern, text), "{pattern:?} {text:?}");
        }
        for (pattern, text) in [
            ("cat /srv/reports/*", "cat /srv/reports/a /etc/shadow"),
            ("cat /srv/reports/*", "cat /srv/reports/../../etc/shadow"),
            ("cat /srv/reports/*", "cat /srv/reports/x/.."),
            (
                "sftp get /srv/reports/*",
                "sftp get /srv/reports/../../etc/shadow",
            ),
            (
                "sftp rename /srv/reports/* /srv/reports/*",
                "sftp rename /srv/reports/a /etc/x /srv/reports/b",
            ),
            ("cp --from=/srv/* x", "cp --from=/srv/.. x"),
            ("cat /srv/reports/.*", "cat /srv/reports/../x"),
            ("systemctl status *", "systemctl restart nginx"),
            ("ls *", "ls"),
            ("cat /srv/reports/*", "cat /srv/reports/a\t/etc/shadow"),
            (
                "cat /srv/reports/*",
                "cat /srv/reports/{a,../../etc/shadow}",
            ),
            ("cat /srv/reports/*", "cat /srv/reports/.*/../x"),
            ("cat /srv/reports/*", "cat /srv/reports/.?/x"),
            ("cat /srv/reports/*", "cat /srv/reports/$X"),
            (
                "cat /srv/reports/*",
                "cat /srv/reports/${X:+../../etc/shadow}",
            ),
            ("cat /srv/reports/*", "cat /srv/reports/`x`"),
        ] {
            assert!(!matches_command(pattern, text), "{pattern:?} {text:?}");
        }
        // Linear in the text.
        let long = format!("cat {}", "a/".repeat(30_000));
        assert!(!matches_command("cat *a*a*a*a*a*a*a*b", &long));
    }
}
