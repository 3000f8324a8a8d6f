//! Built-in detectors of sensitive values, with the checksums that keep false positives down
//! (Luhn for card numbers, mod-97 for IBANs).

use std::sync::LazyLock;

use agentgate_crds::Detector;
use regex::Regex;

/// A byte range of a detected value inside a text.
pub type Span = std::ops::Range<usize>;

fn re(pattern: &str) -> Regex {
    // The patterns are constants of this file; a typo is a bug caught by the unit tests.
    Regex::new(pattern).unwrap_or_else(|e| panic!("built-in detector pattern {pattern}: {e}"))
}

// Any letters (internationalized addresses), `_` in the local part, IP-literal domains, the
// full-width and small at signs and dots; no word boundaries, which `_` next to an address
// would defeat (`id_ada@example.com_x`).
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)[\p{L}\p{N}._%+\-]+[@\x{FF20}\x{FE6B}](?:(?:[\p{L}\p{N}](?:[\p{L}\p{N}\-]*[\p{L}\p{N}])?[.\x{FF0E}\x{3002}])+\p{L}{2,}|\[[0-9a-f.:]+\])",
    )
});
// A run of digits (of any script: full-width, Arabic-Indic…) with up to three separators
// between them (spaces of any kind, dashes, dots, slashes, underscores); when it holds a card
// number (see `card_in_run`), the whole run is masked.
static CARD: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\d(?:[\p{Zs}\-./_\x{2010}-\x{2015}\x{2212}\x{FF0D}\x{FF0E}\x{FF0F}]{0,3}\d){12,}")
});
static DECIMAL_DIGIT: LazyLock<Regex> = LazyLock::new(|| re(r"^\p{Nd}$"));

/// The value of a decimal digit of any script. Unicode keeps each script's digits as ten
/// consecutive code points, zero first, so a digit's value is how far it is into its run.
fn digit_value(c: char) -> Option<u32> {
    if let Some(d) = c.to_digit(10) {
        return Some(d);
    }
    let is_digit = |c: char| DECIMAL_DIGIT.is_match(c.encode_utf8(&mut [0; 4]));
    if !is_digit(c) {
        return None;
    }
    let mut back = 0u32;
    let mut at = u32::from(c);
    while let Some(prev) = at.checked_sub(1).and_then(char::from_u32) {
        if !is_digit(prev) {
            break;
        }
        back += 1;
        at -= 1;
    }
    Some(back % 10)
}
static US_SSN: LazyLock<Regex> = LazyLock::new(|| re(r"\b(\d{3})-(\d{2})-(\d{4})\b"));
static UK_NINO: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?i)\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
});
static IBAN: LazyLock<Regex> = LazyLock::new(|| re(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"));
static JWT: LazyLock<Regex> =
    LazyLock::new(|| re(r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{2,}\.[A-Za-z0-9_\-]*"));
static AWS: LazyLock<Regex> =
    LazyLock::new(|| re(r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b"));
// A secret access key has no prefix of its own: found by the name it is given.
static AWS_SECRET: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r#"(?i)(?:aws_?secret_?access_?key|aws_?secret_?key|secret_?access_?key)["']?\s*[:=]\s*["']?[A-Za-z0-9/+]{40}"#,
    )
});
static GCP: LazyLock<Regex> = LazyLock::new(|| re(r"\bAIza[0-9A-Za-z_\-]{35}"));
static GITHUB: LazyLock<Regex> =
    LazyLock::new(|| re(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"));
static PRIVATE_KEY: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?s:.*?)(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\z)",
    )
});

/// Whether the digits of `s` pass the Luhn check.
pub fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(digit_value).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether `s` is an IBAN with a valid mod-97 check.
pub fn iban_valid(s: &str) -> bool {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if compact.len() < 15 || compact.len() > 34 {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c {
            '0'..='9' => c as u32 - '0' as u32,
            'A'..='Z' => c as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// Whether a run of digits (with separators) holds a card number: its groups (as the
/// separators split them) from the first one, or up to the last one, hold 13 to 19 digits
/// that pass the Luhn check (a card followed by its CVV or expiry, or after a prefix).
fn card_in_run(run: &str) -> bool {
    let groups: Vec<String> = run
        .split(|c: char| digit_value(c).is_none())
        .filter(|g| !g.is_empty())
        .map(|g| {
            g.chars()
                .filter_map(digit_value)
                .filter_map(|d| char::from_digit(d, 10))
                .collect()
        })
        .collect();
    let n = groups.len();
    (1..=n).any(|k| {
        [groups[..k].concat(), groups[n - k..].concat()]
            .iter()
            .any(|d| (13..=19).contains(&d.len()) && luhn(d))
    })
}

fn valid_ssn(c: &regex::Captures<'_>) -> bool {
    let area = &c[1];
    area != "000" && area != "666" && !area.starts_with('9') && &c[2] != "00" && &c[3] != "0000"
}

/// Every span of `text` that `detector` finds.
pub fn find(detector: Detector, text: &str) -> Vec<Span> {
    match detector {
        Detector::Email => EMAIL.find_iter(text).map(|m| m.range()).collect(),
        Detector::CardNumber => CARD
            .find_iter(text)
            .filter(|m| card_in_run(m.as_str()))
            .map(|m| m.range())
            .collect(),
        Detector::UsSsn => US_SSN
            .captures_iter(text)
            .filter(valid_ssn)
            .filter_map(|c| c.get(0).map(|m| m.range()))
            .collect(),
        Detector::UkNino => UK_NINO.find_iter(text).map(|m| m.range()).collect(),
        Detector::Iban => IBAN
            .find_iter(text)
            .filter(|m| iban_valid(m.as_str()))
            .map(|m| m.range())
            .collect(),
        Detector::Jwt => JWT.find_iter(text).map(|m| m.range()).collect(),
        Detector::AwsAccessKey => AWS
            .find_iter(text)
            .chain(AWS_SECRET.find_iter(text))
            .map(|m| m.range())
            .collect(),
        Detector::GcpApiKey => GCP.find_iter(text).map(|m| m.range()).collect(),
        Detector::GithubToken => GITHUB.find_iter(text).map(|m| m.range()).collect(),
        Detector::PrivateKey => PRIVATE_KEY.find_iter(text).map(|m| m.range()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(d: Detector, text: &str) -> Vec<&str> {
        find(d, text).into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn detectors_find_what_they_should_and_not_more() {
        assert_eq!(
            found(Detector::Email, "write to Ada.L@Example.co.uk now"),
            ["Ada.L@Example.co.uk"]
        );
        assert!(found(Detector::Email, "not@an-address").is_empty());
        assert_eq!(
            found(Detector::CardNumber, "card 4111 1111 1111 1111."),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(
            found(Detector::CardNumber, "4111-1111-1111-1111"),
            ["4111-1111-1111-1111"]
        );
        assert!(
            found(Detector::CardNumber, "4111 1111 1111 1112").is_empty(),
            "Luhn fails"
        );
        assert!(found(Detector::CardNumber, "order 1234567890123").is_empty());
        assert_eq!(found(Detector::UsSsn, "ssn 123-45-6789"), ["123-45-6789"]);
        assert!(found(Detector::UsSsn, "000-12-3456 666-12-3456 912-12-3456").is_empty());
        assert_eq!(
            found(Detector::UkNino, "NI: AB 12 34 56 C"),
            ["AB 12 34 56 C"]
        );
        assert!(
            found(Detector::UkNino, "QQ 12 34 56 C").is_empty(),
            "QQ is never issued"
        );
        assert_eq!(
            found(Detector::Iban, "pay GB82 WEST 1234 5698 7654 32 today"),
            ["GB82 WEST 1234 5698 7654 32"]
        );
        assert!(
            found(Detector::Iban, "GB82 WEST 1234 5698 7654 33").is_empty(),
            "mod-97 fails"
        );
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjbGF1ZGUifQ.c2lnbmF0dXJl";
        assert_eq!(found(Detector::Jwt, &format!("Bearer {jwt}")), [jwt]);
        assert_eq!(
            found(Detector::AwsAccessKey, "key=AKIAIOSFODNN7EXAMPLE;"),
            ["AKIAIOSFODNN7EXAMPLE"]
        );
        assert_eq!(
            found(
                Detector::GcpApiKey,
                "AIzaSyA1234567890abcdefghijklmnopqrstuv"
            ),
            ["AIzaSyA1234567890abcdefghijklmnopqrstuv"]
        );
        let gh = format!("ghp_{}", "a".repeat(36));
        assert_eq!(found(Detector::GithubToken, &gh), [gh.as_str()]);
        let pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----";
        assert_eq!(found(Detector::PrivateKey, &format!("x\n{pem}\ny")), [pem]);
        // What the review found passing.
        assert_eq!(
            found(Detector::CardNumber, "4111 1111 1111 1111 123"),
            ["4111 1111 1111 1111 123"]
        );
        assert_eq!(
            found(Detector::CardNumber, "4111-1111-1111-1111-12/25"),
            ["4111-1111-1111-1111-12/25"]
        );
        assert_eq!(
            found(Detector::CardNumber, "card_4111111111111111"),
            ["4111111111111111"]
        );
        assert_eq!(
            found(Detector::CardNumber, "4111  1111  1111  1111"),
            ["4111  1111  1111  1111"]
        );
        assert!(found(Detector::CardNumber, &"1234567890".repeat(4)).is_empty());
        // Other separators, other scripts' digits.
        for card in [
            "4111.1111.1111.1111",
            "4111/1111/1111/1111",
            "4111   1111   1111   1111",
            "4111_1111_1111_1111",
            "\u{FF14}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}",
            "\u{0664}\u{0661}\u{0661}\u{0661} \u{0661}\u{0661}\u{0661}\u{0661} \u{0661}\u{0661}\u{0661}\u{0661} \u{0661}\u{0661}\u{0661}\u{0661}",
        ] {
            assert_eq!(found(Detector::CardNumber, card), vec![card], "{card}");
        }
        assert!(found(Detector::CardNumber, "4111.1111.1111.1112").is_empty());
        // Full-width at signs and dots.
        for email in ["ada\u{FF20}example.com", "ada\u{FE6B}example\u{FF0E}com"] {
            assert_eq!(found(Detector::Email, email), vec![email], "{email}");
        }
        for (text, want) in [
            ("first_last@example.com", "first_last@example.com"),
            ("ada@bücher.de", "ada@bücher.de"),
            ("josé@example.com", "josé@example.com"),
            ("to ada@[10.0.0.1].", "ada@[10.0.0.1]"),
            ("ada@example.com_x", "ada@example.com"),
        ] {
            assert_eq!(found(Detector::Email, text), [want], "{text}");
        }
        let secret = "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        assert_eq!(found(Detector::AwsAccessKey, secret), [secret]);
        let pgp =
            "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF\n-----END PGP PRIVATE KEY BLOCK-----";
        assert_eq!(found(Detector::PrivateKey, pgp), [pgp]);
        // A key cut off mid-value is still masked to the end.
        let cut = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpA";
        assert_eq!(found(Detector::PrivateKey, cut), [cut]);
    }
}
