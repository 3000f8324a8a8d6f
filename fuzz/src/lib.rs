//! Fuzz targets for every parser that reads what an agent, a database, an API server, an
//! issuer or a policy author sends.
//!
//! Each function takes the fuzzer's bytes, runs one of agentgate's parsers on them and checks
//! what must hold whatever the input (a round trip, a masked value staying masked, a forged
//! token staying refused). A panic, inside agentgate or in a check here, is a finding.
//!
//! `scripts/fuzz.sh` runs them with libFuzzer (`cargo fuzz`); `cargo test -p agentgate-fuzz`
//! replays the committed corpora (`fuzz/corpus/<target>/`) and every input that once failed
//! (`fuzz/regressions/<target>/`) on each build.

use std::sync::OnceLock;

use agentgate_sidecar::gateway::kube::list::{ListError, Splitter, Step};
use agentgate_sidecar::gateway::kube::mask::{Masker, SECRET_REPLACEMENT};
use agentgate_sidecar::gateway::postgres::backend::{self, ErrorFields};
use agentgate_sidecar::gateway::postgres::data_row::{self, Formats};
use agentgate_sidecar::gateway::postgres::frame::{Frame, MAX_MESSAGE, read_frame, read_startup};
use agentgate_sidecar::gateway::postgres::frontend;
use agentgate_sidecar::gateway::ssh::command;
use agentgate_sidecar::gateway::ssh::terminal::{Input, LineDiscipline, OutputMasker};
use agentgate_sidecar::identity::Verifier;
use agentgate_sidecar::mask::{Column, MaskSet, Masked, Rule};
use agentgate_sidecar::policy::{Snapshot, folder};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use futures::executor::block_on;
use serde_json::Value;

/// A fuzz target: the fuzzer's bytes in, a panic when something is wrong.
pub type Target = fn(&[u8]);

/// Every target, by name (as `cargo fuzz run <name>` and the corpus folders name them).
pub const TARGETS: &[(&str, Target)] = &[
    ("pg_frontend", pg_frontend),
    ("pg_backend", pg_backend),
    ("pg_data_row", pg_data_row),
    ("sql_classify", sql_classify),
    ("token", token),
    ("ssh_line", ssh_line),
    ("kube_json", kube_json),
    ("kube_list", kube_list),
    ("manifests", manifests),
];

/// The agent's side of the PostgreSQL protocol: the startup packet (SSLRequest,
/// CancelRequest, StartupMessage) and the typed messages after it. Every message that decodes
/// encodes back to one that decodes the same (what the gateway forwards is what it checked).
pub fn pg_frontend(data: &[u8]) {
    let mut r = data;
    let _ = block_on(read_startup(&mut r));
    let mut r = data;
    while let Ok(Some(frame)) = block_on(read_frame(&mut r, MAX_MESSAGE)) {
        if let Ok(msg) = frontend::decode(&frame) {
            let again = frontend::encode(&msg);
            assert_eq!(
                frontend::decode(&again).ok().as_ref(),
                Some(&msg),
                "a decoded message does not survive its own encoding"
            );
        }
    }
}

/// The database's side: authentication requests, RowDescriptions, DataRows, errors and
/// notices, as the gateway reads them from a stream. A DataRow that decodes encodes back to
/// the same bytes.
pub fn pg_backend(data: &[u8]) {
    let mut r = data;
    while let Ok(Some(frame)) = block_on(read_frame(&mut r, MAX_MESSAGE)) {
        match frame.tag {
            b'R' => {
                let _ = backend::decode_authentication(&frame);
            }
            b'T' => {
                let _ = backend::decode_row_description(&frame);
            }
            b'D' => {
                if let Ok(values) = backend::decode_data_row(&frame) {
                    assert_eq!(
                        backend::encode_data_row(&values),
                        frame,
                        "a DataRow does not survive decoding and encoding"
                    );
                }
            }
            b'E' | b'N' => {
                if let Ok(e) = ErrorFields::decode(&frame) {
                    let _ = ErrorFields::decode(&e.to_error());
                }
            }
            _ => {}
        }
    }
}

const HASH_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

/// The MaskPolicy the masking targets use: column rules of every action, and detectors.
fn mask_set() -> &'static MaskSet {
    static SET: OnceLock<MaskSet> = OnceLock::new();
    SET.get_or_init(|| {
        let yaml = r#"
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
"#;
        let p: agentgate_crds::MaskPolicy =
            serde_norway::from_str(yaml).expect("the fuzz MaskPolicy parses");
        MaskSet::compile(&[&p], &|r| (r.name == "k").then(|| HASH_KEY.to_vec()))
            .expect("the fuzz MaskPolicy compiles")
    })
}

/// The column rules a fuzzed row may use, by index (`None`: no column rule).
fn column_rules() -> &'static [Option<Rule>] {
    static RULES: OnceLock<Vec<Option<Rule>>> = OnceLock::new();
    RULES.get_or_init(|| {
        let col = |s: &str, t: &str, c: &str| Column {
            schema: s.into(),
            table: t.into(),
            column: c.into(),
        };
        let m = mask_set();
        vec![
            None,
            m.column_rule(&col("public", "customers", "id")).cloned(),
            m.column_rule(&col("public", "customers", "email")).cloned(),
            m.column_rule(&col("public", "payments", "card")).cloned(),
            m.column_rule(&col("public", "people", "ssn")).cloned(),
        ]
    })
}

/// Type OIDs a fuzzed column may have: text-like, json/jsonb, integers, floats, bool, bytea,
/// numeric, timestamp, an unknown one.
const TYPES: [u32; 16] = [
    25, 1043, 1042, 19, 114, 3802, 705, 21, 23, 20, 26, 700, 701, 16, 17, 1114,
];

/// A DataRow masked as the gateway masks it. The first byte gives the column count; then two
/// bytes per column give its type, format and rule; the rest is the DataRow's body. The
/// masked row is a valid DataRow with as many columns; NULL stays NULL; a column with a rule
/// never passes its value unchanged (unless the value is already what masking makes of it);
/// a SetNull column is NULL.
pub fn pg_data_row(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8);
    if rest.len() < 2 * n {
        return;
    }
    let (spec, body) = rest.split_at(2 * n);
    let rules_all = column_rules();
    let mut types = Vec::with_capacity(n);
    let mut formats = Vec::with_capacity(n);
    let mut rules = Vec::with_capacity(n);
    for c in spec.chunks(2) {
        types.push(TYPES[usize::from(c[0]) % TYPES.len()]);
        formats.push(i16::from(c[1] & 1));
        rules.push(rules_all[usize::from(c[1] >> 1) % rules_all.len()].clone());
    }
    let frame = Frame::new(b'D', Bytes::copy_from_slice(body));
    let mut counts = Default::default();
    let Some(out) = data_row::mask(
        mask_set(),
        &frame,
        Formats::Described(&formats),
        &types,
        &rules,
        &mut counts,
    ) else {
        // Malformed: the gateway ends the connection with an error.
        assert!(backend::decode_data_row(&frame).is_err());
        return;
    };
    let before = backend::decode_data_row(&frame).expect("masked, so it decoded");
    let after = backend::decode_data_row(&out).expect("a masked DataRow decodes");
    assert_eq!(
        before.len(),
        after.len(),
        "masking changed the column count"
    );
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let Some(b) = b else {
            assert!(a.is_none(), "column {i}: NULL became a value");
            continue;
        };
        let Some(Some(rule)) = rules.get(i) else {
            continue;
        };
        if rule.name == "pii/ssn" {
            assert!(a.is_none(), "column {i}: a SetNull column is not NULL");
        }
        if a.as_ref() == Some(b) {
            // Only a value that already is its own masking may pass as it is.
            let text = String::from_utf8_lossy(b);
            let own = match rule.apply_whole(&text) {
                Masked::Text(t) => {
                    t.as_bytes() == &b[..]
                        || serde_json::Value::String(t).to_string().as_bytes() == &b[..]
                }
                _ => false,
            };
            assert!(
                own,
                "column {i}: rule {} let a value through unchanged",
                rule.name
            );
        }
    }
}

/// The SQL classifier on any text: it never accepts what PostgreSQL's own grammar rejects,
/// and every statement it accepts has a class.
pub fn sql_classify(data: &[u8]) {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let classified = agentgate_sidecar::sql::classify(sql);
    if pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).is_err() {
        assert!(
            classified.is_err(),
            "the classifier accepted what PostgreSQL rejects"
        );
    }
    // What records keep of it: never a constant.
    let _ = agentgate_sidecar::sql::redact(sql);
    if let Ok(c) = classified {
        assert_eq!(c.fingerprint.get().len(), 64);
        for i in 0..3 {
            let _ = agentgate_sidecar::sql::classify::target_column_refs(sql, i);
        }
    }
}

const ISSUER: &str = "https://127.0.0.1:9/fuzz";
const AUDIENCE: &str = "agentgate-fuzz";
const SUBJECT: &str = "agent-7";

struct Tokens {
    runtime: tokio::runtime::Runtime,
    verifier: Verifier,
    snapshot: Snapshot,
    key: aws_lc_rs::signature::EcdsaKeyPair,
    valid: String,
}

fn tokens() -> &'static Tokens {
    static T: OnceLock<Tokens> = OnceLock::new();
    T.get_or_init(|| {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("a key");
        let point = key.public_key().as_ref().to_vec();
        let (x, y) = point[1..].split_at(32);
        let decoding = jsonwebtoken::DecodingKey::from_ec_components(
            &URL_SAFE_NO_PAD.encode(x),
            &URL_SAFE_NO_PAD.encode(y),
        )
        .expect("a decoding key");
        let verifier = Verifier::new(None, None).expect("a verifier");
        runtime.block_on(verifier.pin_key(
            ISSUER,
            "k1",
            decoding,
            Some(jsonwebtoken::Algorithm::ES256),
        ));
        let snapshot = folder::load_str(&format!(
            "apiVersion: agentgate.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{ name: fuzz }}\nspec:\n  owner: fuzz\n  authentication:\n    oidc: {{ issuer: \"{ISSUER}\", audience: {AUDIENCE}, subject: {SUBJECT} }}\n"
        ))
        .expect("the fuzz identity loads");
        let mut t = Tokens {
            runtime,
            verifier,
            snapshot,
            key,
            valid: String::new(),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        t.valid = sign(
            &t.key,
            br#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#,
            format!(
                r#"{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"{SUBJECT}","exp":{},"iat":{now}}}"#,
                now + 3600 * 24 * 365
            )
            .as_bytes(),
        );
        assert!(
            t.runtime
                .block_on(t.verifier.verify(&t.valid, &t.snapshot))
                .is_ok(),
            "the fuzz token verifies"
        );
        t
    })
}

fn sign(key: &aws_lc_rs::signature::EcdsaKeyPair, header: &[u8], claims: &[u8]) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let sig = key.sign(&rng, message.as_bytes()).expect("signed");
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// Token verification. The first byte picks how the rest is used:
/// - as the whole token: it verifies only if it is the one valid token;
/// - as edits of the valid token (position, byte pairs): it verifies only if unchanged;
/// - as a header and claims (split at the first 0xFF) signed with the issuer's real key: it
///   verifies only if the header says ES256 and the claims name the issuer, the audience and
///   the subject, with an expiry in the future and no not-before in the future.
pub fn token(data: &[u8]) {
    let t = tokens();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let verify = |token: &str| t.runtime.block_on(t.verifier.verify(token, &t.snapshot));
    match mode % 3 {
        0 => {
            let token = String::from_utf8_lossy(rest);
            if verify(&token).is_ok() {
                assert_eq!(
                    token.trim(),
                    t.valid,
                    "a token that is not the valid one verified"
                );
            }
        }
        1 => {
            let mut bytes = t.valid.clone().into_bytes();
            for pair in rest.chunks(3) {
                if let [hi, lo, b] = pair {
                    let at = (usize::from(*hi) << 8 | usize::from(*lo)) % (bytes.len() + 1);
                    if at == bytes.len() {
                        bytes.push(*b);
                    } else {
                        bytes[at] = *b;
                    }
                }
            }
            let token = String::from_utf8_lossy(&bytes);
            if verify(&token).is_ok() {
                assert_eq!(token.trim(), t.valid, "an edited token verified");
            }
        }
        _ => {
            let (header, claims) = match rest.iter().position(|b| *b == 0xff) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &b"{}"[..]),
            };
            let token = sign(&t.key, header, claims);
            if verify(&token).is_ok() {
                let h: Value = serde_json::from_slice(header).expect("a verified header is JSON");
                let c: Value = serde_json::from_slice(claims).expect("verified claims are JSON");
                assert_eq!(h["alg"], "ES256", "verified under another algorithm");
                assert_eq!(c["iss"], ISSUER, "verified for another issuer");
                assert_eq!(c["sub"], SUBJECT, "verified for another subject");
                let aud_ok = c["aud"] == AUDIENCE
                    || c["aud"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == AUDIENCE));
                assert!(aud_ok, "verified for another audience: {}", c["aud"]);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let exp = c["exp"]
                    .as_f64()
                    .expect("a verified token has a numeric exp");
                assert!(exp + 30.0 >= now, "an expired token verified");
                if let Some(nbf) = c.get("nbf") {
                    let nbf = nbf.as_f64().expect("nbf is numeric");
                    assert!(nbf - 30.0 <= now, "a token not yet valid verified");
                }
            }
        }
    }
}

/// The agent's keystrokes on an SSH session, cut into lines (the first byte sets the chunk
/// size the bytes arrive in) and each line classified; the host's output masked a line at a
/// time. Nothing refused is ever handed on as a line, and a line handed on parses.
pub fn ssh_line(data: &[u8]) {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut discipline = LineDiscipline::default();
    for piece in rest.chunks(chunk) {
        for input in discipline.feed(piece, command::is_incomplete) {
            if let Input::Line { text, .. } = input {
                let _ = command::classify(&text);
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = command::classify(text);
        let _ = command::is_incomplete(text);
    }
    let mut out = OutputMasker::default();
    let mut masked = Vec::new();
    for piece in rest.chunks(chunk) {
        masked.extend(out.feed(mask_set(), piece));
    }
    masked.extend(out.flush(mask_set()));
}

const SECRET_B64: &str = "KioqKg==";

/// Kubernetes responses masked as the gateway masks them (objects, lists, `Table`s, watch
/// events). Whatever the document, no Secret's `data` or `stringData` value passes in clear.
pub fn kube_json(data: &[u8]) {
    let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let mut m = Masker {
        masks: mask_set(),
        reveal_secrets: false,
        hint: Some((String::new(), "Secret".into())),
        counts: Default::default(),
    };
    m.document(&mut v);
    check_secrets(&v);
}

/// Asserts that every Secret object in `v` (at any depth a response can carry one) has its
/// values masked.
fn check_secrets(v: &Value) {
    assert_eq!(STANDARD.encode(SECRET_REPLACEMENT), SECRET_B64);
    let is_secret = v.get("kind").and_then(Value::as_str) == Some("Secret")
        && v.get("apiVersion").and_then(Value::as_str) == Some("v1");
    if is_secret {
        for (field, want) in [("data", SECRET_B64), ("stringData", SECRET_REPLACEMENT)] {
            if let Some(map) = v.get(field).and_then(Value::as_object) {
                for (k, value) in map {
                    assert_eq!(
                        value.as_str(),
                        Some(want),
                        "Secret {field}.{k} passed unmasked"
                    );
                }
            }
        }
        return;
    }
    // Objects nested where responses carry them: list items, Table rows, watch events.
    if v.get("kind").and_then(Value::as_str) == Some("SecretList")
        && v.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && let Some(items) = v.get("items").and_then(Value::as_array)
    {
        for item in items {
            if item.get("kind").is_none() && item.get("apiVersion").is_none() {
                check_fields(item);
            }
        }
    }
    if let Some(obj) = v.get("object")
        && v.get("kind").is_none()
        && v.get("type").is_some()
    {
        check_secrets(obj);
    }
}

/// The `data` and `stringData` of an item of a SecretList (items carry no kind).
fn check_fields(item: &Value) {
    for (field, want) in [("data", SECRET_B64), ("stringData", SECRET_REPLACEMENT)] {
        if let Some(map) = item.get(field).and_then(Value::as_object) {
            for value in map.values() {
                assert_eq!(
                    value.as_str(),
                    Some(want),
                    "a SecretList item passed unmasked"
                );
            }
        }
    }
}

/// A list response streamed through the list splitter in chunks (the first byte sets their
/// size), each item masked. When the splitter takes the document as a list, what it sends
/// is valid JSON again and no Secret item's value passes in clear; and each item, masked
/// from its text (only the fields masking reads parsed), is exactly the item masked whole.
pub fn kube_list(data: &[u8]) {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut s = Splitter::new();
    let mut out = Vec::new();
    let masker = || Masker {
        masks: mask_set(),
        reveal_secrets: false,
        hint: None,
        counts: Default::default(),
    };
    let mut mask = |raw: &[u8], kind: &(String, String), out: &mut Vec<u8>| {
        let start = out.len();
        let mut lazily = masker();
        lazily
            .item_json(raw, &kind.0, &kind.1, out)
            .map_err(|_| ListError::Invalid("an item does not parse"))?;
        let item: Value = serde_json::from_slice(raw).expect("a masked item parsed");
        let api = if kind.0.is_empty() {
            "v1".to_owned()
        } else {
            format!("{}/v1", kind.0)
        };
        let mut whole = serde_json::json!({"kind": format!("{}List", kind.1), "apiVersion": api, "items": [item]});
        let mut m = masker();
        m.document(&mut whole);
        let lazy: Value = serde_json::from_slice(&out[start..]).expect("a masked item is JSON");
        assert_eq!(
            lazy, whole["items"][0],
            "an item masked from its text differs"
        );
        assert_eq!(
            lazily.counts, m.counts,
            "an item masked from its text counts otherwise"
        );
        Ok(())
    };
    for piece in rest.chunks(chunk) {
        match s.feed(piece, &mut mask) {
            Ok(Step::Send(bytes)) => out.extend(bytes),
            Ok(_) | Err(_) => return,
        }
    }
    if !s.finished() {
        return;
    }
    let v: Value = serde_json::from_slice(&out).expect("a streamed list is valid JSON");
    if v.get("kind").and_then(Value::as_str) == Some("SecretList")
        && let Some(items) = v.get("items").and_then(Value::as_array)
    {
        for item in items {
            check_fields(item);
        }
    }
}

/// The policy folder's loader on any text, and the MaskPolicies it loads compiled (user
/// patterns included): errors, never a panic or a hang.
pub fn manifests(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(s) = folder::load_str(text) {
        for p in s.masks.values() {
            let _ = MaskSet::compile(&[p], &|_| Some(HASH_KEY.to_vec()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::TARGETS;

    /// Replays every committed input of every target: the corpora and the regressions (each
    /// an input that once failed).
    #[test]
    fn corpora_and_regressions_replay_clean() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut replayed = 0;
        for (name, target) in TARGETS {
            for dir in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    assert!(dir != "corpus", "no corpus for {name}");
                    continue;
                };
                for e in entries {
                    let path = e.expect("a corpus entry").path();
                    // (A fuzzer running meanwhile may have replaced it by a smaller one.)
                    let Ok(data) = std::fs::read(&path) else {
                        continue;
                    };
                    let r = std::panic::catch_unwind(|| target(&data));
                    assert!(r.is_ok(), "{name}: {} fails", path.display());
                    replayed += 1;
                }
            }
        }
        assert!(replayed > 0);
    }
}
