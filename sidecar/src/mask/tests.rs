use super::*;
use agentgate_crds::MaskPolicy;

fn policy(yaml: &str) -> MaskPolicy {
    let v: serde_json::Value = serde_norway::from_str(yaml).unwrap();
    serde_json::from_value(v).unwrap()
}

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn set() -> MaskSet {
    let p = policy(
        r#"
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: { name: pii }
spec:
  hashKey: { name: k, key: key }
  rules:
    - { name: ids, columns: ["public.customers.id"], action: Hash }
    - { name: emails, columns: ["*.email"], detectors: [Email], action: Redact }
    - { name: cards, columns: ["payments.card"], detectors: [CardNumber], action: Partial, keepLast: 4 }
    - { name: ssn, columns: ["ssn"], detectors: [UsSsn], action: SetNull }
    - { name: secrets, detectors: [Jwt, AwsAccessKey, PrivateKey, GithubToken], action: Redact, replacement: "[secret]" }
    - { name: tickets, patterns: ["TICKET-[0-9]{4}"], action: Redact, replacement: "TICKET-****" }
"#,
    );
    MaskSet::compile(&[&p], &|r| (r.name == "k").then(|| KEY.to_vec())).unwrap()
}

fn col(s: &str, t: &str, c: &str) -> Column {
    Column {
        schema: s.into(),
        table: t.into(),
        column: c.into(),
    }
}

fn text(m: (Masked, Vec<String>)) -> String {
    match m.0 {
        Masked::Text(t) => t,
        Masked::Clear => "<clear>".into(),
        Masked::Null => "<null>".into(),
    }
}

#[test]
fn column_rules_mask_the_whole_value() {
    let s = set();
    assert_eq!(
        text(s.mask(
            Some(&col("public", "customers", "email")),
            "ada@example.com"
        )),
        "****"
    );
    // Even when the value does not look like an e-mail: the column decides.
    assert_eq!(
        text(s.mask(Some(&col("crm", "contacts", "email")), "n/a")),
        "****"
    );
    assert_eq!(
        text(s.mask(Some(&col("public", "payments", "card")), "4111111111111111")),
        "************1111"
    );
    assert_eq!(
        s.mask(Some(&col("public", "people", "ssn")), "123-45-6789")
            .0,
        Masked::Null
    );
    let (m, rules) = s.mask(Some(&col("public", "customers", "id")), "42");
    assert_eq!(rules, ["pii/ids"]);
    let Masked::Text(h) = m else { panic!("hash") };
    assert_eq!(h.len(), 64);
    // Deterministic: joins on the hash still work; different values differ.
    assert_eq!(
        text(s.mask(Some(&col("public", "customers", "id")), "42")),
        h
    );
    assert_ne!(
        text(s.mask(Some(&col("public", "customers", "id")), "43")),
        h
    );
    // Other columns pass.
    assert_eq!(
        s.mask(Some(&col("public", "customers", "name")), "Ada").0,
        Masked::Clear
    );
}

#[test]
fn detectors_mask_inside_any_value() {
    let s = set();
    let cases = [
        (
            "contact ada@example.com or bob@example.org",
            "contact **** or ****",
        ),
        (
            "paid with 4111 1111 1111 1111 yesterday",
            "paid with **** **** **** 1111 yesterday",
        ),
        ("ssn 123-45-6789", "<null>"),
        (
            "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln here",
            "token [secret] here",
        ),
        ("AKIAIOSFODNN7EXAMPLE", "[secret]"),
        (
            "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----",
            "[secret]",
        ),
        (
            "see TICKET-1234 and TICKET-99",
            "see TICKET-**** and TICKET-99",
        ),
        (
            "{\"email\":\"ada@example.com\",\"n\":1}",
            "{\"email\":\"****\",\"n\":1}",
        ),
        ("ada@example.com,bob@example.com", "****,****"),
        ("nothing to see", "<clear>"),
        ("4111 1111 1111 1112 fails Luhn", "<clear>"),
    ];
    for (input, want) in cases {
        assert_eq!(text(s.mask(None, input)), want, "{input}");
    }
}

#[test]
fn partial_keeps_separators_and_never_reveals_most_of_a_short_value() {
    assert_eq!(partial("4111-1111-1111-1111", 4), "****-****-****-1111");
    assert_eq!(partial("ab", 4), "*b");
    assert_eq!(partial("", 4), "");
    assert_eq!(partial("Zoë Ünïcode", 3), "*** ****ode");
}

#[test]
fn policies_that_cannot_be_compiled_are_errors() {
    let bad = policy(
        "apiVersion: agentgate.dev/v1alpha1\nkind: MaskPolicy\nmetadata: {name: p}\nspec: {rules: [{name: r, patterns: ['(unclosed'], action: Redact}]}\n",
    );
    let e = MaskSet::compile(&[&bad], &|_| None).unwrap_err();
    assert!(
        e.to_string().contains("rule r: pattern 0 does not compile"),
        "{e}"
    );
    let nokey = policy(
        "apiVersion: agentgate.dev/v1alpha1\nkind: MaskPolicy\nmetadata: {name: p}\nspec: {hashKey: {name: k, key: key}, rules: [{name: r, columns: [x], action: Hash}]}\n",
    );
    assert!(matches!(
        MaskSet::compile(&[&nokey], &|_| None),
        Err(MaskError::HashKey { .. })
    ));
    assert!(matches!(
        MaskSet::compile(&[&nokey], &|_| Some(b"short".to_vec())),
        Err(MaskError::HashKey { .. })
    ));
}
