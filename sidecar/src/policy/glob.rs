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
}
