//! `*` globs, the only pattern syntax of agentgate's manifests.

/// Whether `pattern` matches all of `text`; `*` matches any run of characters (also none).
pub fn matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative wildcard matching with one backtrack point: linear in practice, never
    // exponential.
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// [`matches`], ignoring ASCII case (for SQL keywords).
pub fn matches_ci(pattern: &str, text: &str) -> bool {
    matches(&pattern.to_ascii_lowercase(), &text.to_ascii_lowercase())
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
    }
}
