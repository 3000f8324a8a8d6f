//! `sed` as GNU sed reads its arguments and scripts: what a script runs (the `e` command, the
//! `e` flag of `s`) and the files it writes (`w`, `W`, the `w` flag of `s`, `-i`). Addresses
//! are read whole (`1e id`, `/x/,+2e id`, `$!e id`), so a command is found wherever sed would
//! find it. What cannot be read is treated as running commands (held, never passed as a
//! read).

use super::WordText;

/// What a `sed` invocation does besides printing edited text.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// It runs commands, or its script could not be read or known (`-f file`, `$script`).
    pub runs: bool,
    /// Files its scripts write (`w file`).
    pub writes: Vec<String>,
    /// Files edited in place (`-i`).
    pub in_place: Vec<String>,
}

/// The effects of `sed` run with `args` (its words after the name).
pub fn invocation(args: &[WordText]) -> Effects {
    let mut scripts: Vec<&WordText> = Vec::new();
    let mut positional: Vec<&WordText> = Vec::new();
    let mut effects = Effects::default();
    let mut in_place = false;
    // A script was given by option (`-e`, `-f`): every operand is a file.
    let mut given = false;
    let mut options = true;
    let mut i = 0;
    while i < args.len() {
        let w = &args[i];
        let a = w.text.as_str();
        i += 1;
        if !options || !a.starts_with('-') || a == "-" {
            positional.push(w);
            continue;
        }
        if w.dynamic {
            // An option the host decides: it may be `-f` or `-e`.
            effects.runs = true;
            continue;
        }
        if a == "--" {
            options = false;
            continue;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            // GNU getopt takes any unambiguous abbreviation (`--exp`, `--in`).
            let is = |full: &str| !name.is_empty() && full.starts_with(name);
            if is("expression") {
                given = true;
                match value {
                    Some(v) => effects_of_text(v, &mut effects),
                    None => match args.get(i) {
                        Some(v) => {
                            scripts.push(v);
                            i += 1;
                        }
                        None => effects.runs = true,
                    },
                }
            } else if is("file") && name.len() >= 2 {
                given = true;
                effects.runs = true;
                if value.is_none() {
                    i += 1;
                }
            } else if is("in-place") {
                in_place = true;
            } else if is("line-length") && name.len() >= 2 {
                if value.is_none() {
                    i += 1;
                }
            } else if ![
                "quiet",
                "silent",
                "debug",
                "follow-symlinks",
                "null-data",
                "zero-terminated",
                "posix",
                "regexp-extended",
                "separate",
                "sandbox",
                "unbuffered",
                "binary",
                "help",
                "version",
            ]
            .iter()
            .any(|o| is(o))
            {
                // An option this check does not know may take the next word as a value.
                effects.runs = true;
            }
            continue;
        }
        // A cluster of short options: `-ne 1e\ id`, `-nes/x/y/e`, `-i.bak` (the suffix).
        let flags = &a[1..];
        for (at, c) in flags.char_indices() {
            let rest = &flags[at + c.len_utf8()..];
            match c {
                'n' | 'r' | 'E' | 's' | 'u' | 'z' | 'b' => {}
                'i' => {
                    in_place = true;
                    break;
                }
                'e' | 'f' | 'l' => {
                    given |= c != 'l';
                    let value = if rest.is_empty() {
                        i += 1;
                        args.get(i - 1).map(|v| (v.text.as_str(), v.dynamic))
                    } else {
                        Some((rest, false))
                    };
                    match (c, value) {
                        ('e', Some((script, false))) => effects_of_text(script, &mut effects),
                        ('l', Some(_)) => {}
                        _ => effects.runs = true,
                    }
                    break;
                }
                _ => {
                    effects.runs = true;
                    break;
                }
            }
        }
    }
    // With POSIXLY_CORRECT, options end at the first operand: words before a later `-e`
    // are then a script and files, so each is also read as a script.
    if given {
        for w in &positional {
            match script_effects(&w.text) {
                _ if w.dynamic => effects.runs = true,
                Some((runs, writes)) => {
                    effects.runs |= runs;
                    effects.writes.extend(writes);
                }
                None => {}
            }
        }
    }
    let mut files = positional.into_iter();
    if !given {
        // No `-e`/`-f`: the first operand is the script.
        match files.next() {
            Some(s) if !s.dynamic => effects_of_text(&s.text, &mut effects),
            Some(_) => effects.runs = true,
            None => {}
        }
    }
    for s in scripts {
        if s.dynamic {
            effects.runs = true;
        } else {
            effects_of_text(&s.text, &mut effects);
        }
    }
    if in_place {
        effects.in_place = files.map(|f| f.text.clone()).collect();
    }
    effects
}

fn effects_of_text(script: &str, effects: &mut Effects) {
    match script_effects(script) {
        Some((runs, writes)) => {
            effects.runs |= runs;
            effects.writes.extend(writes);
        }
        None => effects.runs = true,
    }
}

/// Reads a sed script: whether it runs commands and the files it writes; `None` when it
/// cannot be read.
pub fn script_effects(script: &str) -> Option<(bool, Vec<String>)> {
    let c: Vec<char> = script.chars().collect();
    let mut runs = false;
    let mut writes = Vec::new();
    let mut i = 0;
    loop {
        while i < c.len() && (c[i].is_whitespace() || c[i] == ';') {
            i += 1;
        }
        if i >= c.len() {
            return Some((runs, writes));
        }
        if c[i] == '#' {
            i = to_line_end(&c, i);
            continue;
        }
        i = address(&c, i, false)?;
        i = spaces(&c, i);
        if c.get(i) == Some(&',') {
            i = address(&c, spaces(&c, i + 1), true)?;
        }
        i = spaces(&c, i);
        while c.get(i) == Some(&'!') {
            i = spaces(&c, i + 1);
        }
        let cmd = *c.get(i)?;
        i += 1;
        match cmd {
            '{' | '}' => {}
            '=' | 'd' | 'D' | 'g' | 'G' | 'h' | 'H' | 'n' | 'N' | 'p' | 'P' | 'x' | 'z' | 'F' => {}
            'q' | 'Q' | 'l' | 'L' => {
                i = spaces(&c, i);
                while i < c.len() && c[i].is_ascii_digit() {
                    i += 1;
                }
            }
            // A label (or `v`'s version) ends at a blank, `;` or a newline, and the script
            // goes on after it (`:x e id` runs `id`); ending it later would hide commands.
            ':' | 'b' | 't' | 'T' | 'v' => {
                i = spaces(&c, i);
                while i < c.len() && !c[i].is_whitespace() && c[i] != ';' && c[i] != '}' {
                    i += 1;
                }
            }
            'a' | 'i' | 'c' => i = text_end(&c, i),
            'r' | 'R' => i = to_line_end(&c, i),
            'w' | 'W' => {
                let end = to_line_end(&c, i);
                writes.push(c[i..end].iter().collect::<String>().trim().to_owned());
                i = end;
            }
            'e' => {
                runs = true;
                i = to_line_end(&c, i);
            }
            's' => {
                i = two_parts(&c, i)?;
                // Flags.
                loop {
                    match c.get(i) {
                        None => break,
                        Some('g' | 'p' | 'i' | 'I' | 'm' | 'M') => i += 1,
                        Some(d) if d.is_ascii_digit() => i += 1,
                        Some('e') => {
                            runs = true;
                            i += 1;
                        }
                        Some('w') => {
                            let end = to_line_end(&c, i + 1);
                            writes.push(c[i + 1..end].iter().collect::<String>().trim().to_owned());
                            i = end;
                            break;
                        }
                        Some(';' | '\n' | '}' | ' ' | '\t') => break,
                        Some(_) => return None,
                    }
                }
            }
            'y' => i = two_parts(&c, i)?,
            _ => return None,
        }
    }
}

fn spaces(c: &[char], mut i: usize) -> usize {
    while i < c.len() && (c[i] == ' ' || c[i] == '\t') {
        i += 1;
    }
    i
}

fn to_line_end(c: &[char], mut i: usize) -> usize {
    while i < c.len() && c[i] != '\n' {
        i += 1;
    }
    i
}

/// The end of `a`/`i`/`c` text: the first newline not escaped by a backslash.
fn text_end(c: &[char], mut i: usize) -> usize {
    while i < c.len() && c[i] != '\n' {
        if c[i] == '\\' {
            i += 1;
        }
        i += 1;
    }
    i.min(c.len())
}

/// Skips the two delimited parts of `s` and `y` (`/re/replacement/`, any delimiter).
fn two_parts(c: &[char], i: usize) -> Option<usize> {
    let delim = *c.get(i)?;
    if delim == '\n' || delim == '\\' {
        return None;
    }
    let i = delimited(c, i + 1, delim)?;
    delimited(c, i, delim)
}

/// Skips text up to and past an unescaped `delim`; `None` when there is none.
fn delimited(c: &[char], mut i: usize, delim: char) -> Option<usize> {
    while i < c.len() {
        if c[i] == '\\' {
            i += 2;
            continue;
        }
        if c[i] == delim {
            return Some(i + 1);
        }
        if c[i] == '\n' {
            return None;
        }
        i += 1;
    }
    None
}

/// Skips an address (`12`, `$`, `/re/I`, `\%re%`, `first~step`; after a comma also `+N` and
/// `~N`); returns where it ends (where it started when there is none).
fn address(c: &[char], mut i: usize, second: bool) -> Option<usize> {
    match c.get(i) {
        Some(d) if d.is_ascii_digit() => {
            while i < c.len() && c[i].is_ascii_digit() {
                i += 1;
            }
            if !second && c.get(i) == Some(&'~') {
                i += 1;
                while i < c.len() && c[i].is_ascii_digit() {
                    i += 1;
                }
            }
        }
        Some('+' | '~') if second => {
            i += 1;
            while i < c.len() && c[i].is_ascii_digit() {
                i += 1;
            }
        }
        Some('$') => i += 1,
        Some('/') => i = delimited(c, i + 1, '/')?,
        Some('\\') => {
            let delim = *c.get(i + 1)?;
            if delim == '\n' || delim == '\\' {
                return None;
            }
            i = delimited(c, i + 2, delim)?;
        }
        _ => {
            if second {
                // A comma with no second address.
                return None;
            }
            return Some(i);
        }
    }
    // Regex address flags.
    while matches!(c.get(i), Some('I' | 'M')) {
        i += 1;
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(args: &[&str]) -> Vec<WordText> {
        args.iter()
            .map(|a| WordText {
                text: (*a).to_owned(),
                dynamic: false,
                pattern: false,
            })
            .collect()
    }

    #[test]
    fn commands_after_any_address_are_found() {
        for script in [
            "1e id",
            "1 e id",
            "$e id",
            "$!e id",
            "/x/e id",
            "/x/I,+2e id",
            "\\%x%e id",
            "0~3e id",
            "1,5!e id",
            "p;e id",
            "1{e id\n}",
            "s/a/b/e",
            "s|a|b|ge",
            "s/a/b/;s/x/y/e",
            "y/a/b/;e",
            ":x e id",
            "v 4.2 e id",
            "b end e id",
            "/x/bx;e id",
        ] {
            let (runs, _) = script_effects(script).unwrap_or((true, Vec::new()));
            assert!(runs, "{script:?}");
        }
        for script in [
            "s/e/E/g",
            "/e/d",
            "1,$p",
            "s/x/y/;p",
            "a text with e",
            "# e id\np",
            "s/\\/e/x/",
        ] {
            assert_eq!(
                script_effects(script),
                Some((false, Vec::new())),
                "{script:?}"
            );
        }
        assert_eq!(
            script_effects("1w /home/u/.bashrc"),
            Some((false, vec!["/home/u/.bashrc".to_owned()]))
        );
        assert_eq!(
            script_effects(":x w .ssh/rc"),
            Some((false, vec![".ssh/rc".to_owned()]))
        );
        assert_eq!(
            script_effects("s/a/b/w out.txt"),
            Some((false, vec!["out.txt".to_owned()]))
        );
        // Unreadable scripts are not reads.
        assert_eq!(script_effects("s/a/b/Z"), None);
        assert_eq!(script_effects("1,"), None);
        assert_eq!(script_effects("k"), None);
    }

    #[test]
    fn options_are_read_as_gnu_sed_reads_them() {
        let e = invocation(&words(&["-n", "1e id", "f.txt"]));
        assert!(e.runs);
        let e = invocation(&words(&["-ne", "1e id"]));
        assert!(e.runs);
        let e = invocation(&words(&["-nes/x/y/e"]));
        assert!(e.runs);
        let e = invocation(&words(&["--expr=1e id"]));
        assert!(e.runs);
        let e = invocation(&words(&["--exp", "$e id"]));
        assert!(e.runs);
        let e = invocation(&words(&["-f", "script.sed"]));
        assert!(e.runs);
        // POSIXLY_CORRECT=1 sed '1e id' -e p f: the first operand is the script.
        let e = invocation(&words(&["1e id", "-e", "p", "f"]));
        assert!(e.runs);
        // `-ie` is in place with the suffix `e`; the script is the next word.
        let e = invocation(&words(&["-ie", "s/a/b/", ".bashrc"]));
        assert!(!e.runs);
        assert_eq!(e.in_place, [".bashrc"]);
        let e = invocation(&words(&["--in-place=.bak", "-e", "s/a/b/", "x", "y"]));
        assert_eq!(e.in_place, ["x", "y"]);
        let e = invocation(&words(&["s/a/b/", "x"]));
        assert_eq!(e, Effects::default());
    }
}
