//! What the gateway spends per statement and per value, without any network: classifying a
//! statement (PostgreSQL's grammar, the whole tree), deciding, and masking a row's values,
//! printed against a baseline measured in the same process (parsing alone with libpg_query;
//! copying the value); and per connection with a token: verifying a token again that verified
//! before (remembered) against verifying a new one (signature and claims).
//! `cargo bench -p agentgate-sidecar --bench statement`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Instant;

use agentgate_crds::MaskPolicy;
use agentgate_sidecar::mask::MaskSet;
use agentgate_sidecar::policy::{Command, Snapshot, decide};
use agentgate_sidecar::sql::classify;

/// Runs `f` `n` times; nanoseconds per call.
fn per_call(n: u32, mut f: impl FnMut(u32)) -> f64 {
    for i in 0..n / 10 {
        f(i);
    }
    let started = Instant::now();
    for i in 0..n {
        f(i);
    }
    started.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let n = 20_000;
    println!(
        "{:<58} {:>10} {:>10} {:>7}",
        "", "ns/op", "baseline", "ratio"
    );
    let row = |what: &str, ns: f64, base: f64| {
        println!(
            "{what:<58} {ns:>10.0} {base:>10.0} {:>7.1}",
            ns / base.max(1.0)
        );
        testenv::bench::Figure::new("statement", what, "ns/op", ns)
            .against(base.max(1.0))
            .report();
    };

    // Statements: other constants each time (simple protocol with literals, as pgbench -M
    // simple sends), a new shape each time, and the same text again (a prepared text).
    let parse_base = per_call(n, |i| {
        let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i}");
        black_box(pg_query::parse(&sql, pg_query::ParserOptions::DEFAULT).unwrap());
    });
    let fresh = per_call(n, |i| {
        let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i}");
        black_box(classify(&sql).unwrap());
    });
    row(
        "classify, other constants each time (vs parse only)",
        fresh,
        parse_base,
    );
    // A new shape each time (another table name): nothing cached, the whole tree walked.
    let new_shape = per_call(n, |i| {
        let sql = format!("SELECT abalance FROM accounts_{i} WHERE aid = 1");
        black_box(classify(&sql).unwrap());
    });
    row(
        "classify, a new shape each time (vs parse only)",
        new_shape,
        parse_base,
    );
    let same = per_call(n, |_| {
        black_box(classify("SELECT abalance FROM pgbench_accounts WHERE aid = $1").unwrap());
    });
    row("classify, repeated text (vs parse only)", same, parse_base);

    // Deciding, with an identity, a target with guardrails, and grants.
    let snapshot: Snapshot = agentgate_sidecar::policy::folder::load_str(
        r#"
apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: { name: db }
spec:
  protocol: Postgres
  postgres: { host: h, database: d, credentials: { name: c } }
  guardrails: [ { name: no-drop, matches: ["DROP TABLE"], action: Block } ]
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: { name: claude }
spec: { owner: o, authentication: { serviceAccount: { name: claude } }, baseline: [ { target: db, scope: { operations: [Read] } } ] }
"#,
    )
    .unwrap();
    let c = classify("SELECT abalance FROM pgbench_accounts WHERE aid = $1").unwrap();
    let now = jiff::Timestamp::now();
    let decide_ns = per_call(n, |_| {
        black_box(decide(
            Some(&snapshot),
            "claude",
            "db",
            &Command::from(&c),
            now,
        ));
    });
    row("decide (vs parse only)", decide_ns, parse_base);

    // Masking a value with detectors (e-mail, card number) against copying it.
    let policy: MaskPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "MaskPolicy", "metadata": { "name": "p" },
        "spec": { "rules": [ { "name": "pii", "detectors": ["Email", "CardNumber"], "action": "Redact" } ] }
    }))
    .unwrap();
    let masks = MaskSet::compile(&[&policy], &|_| None).unwrap();
    let values = [
        "4711",
        "paid",
        "a plain sentence without anything sensitive in it at all",
        "ada@example.com",
    ];
    let copy = per_call(n * 10, |i| {
        black_box(values[i as usize % values.len()].to_owned());
    });
    let masked = per_call(n * 10, |i| {
        black_box(masks.mask(None, values[i as usize % values.len()]));
    });
    row("mask a value with detectors (vs copy)", masked, copy);

    tokens();
}

/// Token verification per connection (`--pg-auth token`; the Kubernetes gateway verifies per
/// request): a token seen before is remembered, its signature not checked again.
fn tokens() {
    use agentgate_sidecar::identity::Verifier;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256,
    };
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{Algorithm, DecodingKey};

    const ISSUER: &str = "https://issuer.bench";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let verifier = Verifier::new(None, None).unwrap();
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let ec = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let point = ec.public_key().as_ref().to_vec();
    let (x, y) = point[1..].split_at(32);
    rt.block_on(async {
        verifier
            .pin_key(
                ISSUER,
                "rsa",
                DecodingKey::from_rsa_der(rsa.public_key().as_ref()),
                Some(Algorithm::RS256),
            )
            .await;
        verifier
            .pin_key(
                ISSUER,
                "ec",
                DecodingKey::from_ec_components(
                    &URL_SAFE_NO_PAD.encode(x),
                    &URL_SAFE_NO_PAD.encode(y),
                )
                .unwrap(),
                Some(Algorithm::ES256),
            )
            .await;
    });
    let snapshot = agentgate_sidecar::policy::folder::load_str(&format!(
        "apiVersion: agentgate.dev/v1alpha1\nkind: AgentIdentity\nmetadata: {{ name: robot }}\nspec:\n  owner: o\n  authentication:\n    oidc: {{ issuer: \"{ISSUER}\", audience: agents, subject: robot }}\n"
    ))
    .unwrap();
    let exp = jiff::Timestamp::now().as_second() + 3600;
    // A token as an issuer signs it; `i` makes each one different (its iat).
    let sign = |alg: &str, i: u32| -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(format!(
                r#"{{"alg":"{alg}","kid":"{}","typ":"JWT"}}"#,
                if alg == "RS256" { "rsa" } else { "ec" }
            )),
            URL_SAFE_NO_PAD.encode(format!(
                r#"{{"iss":"{ISSUER}","aud":"agents","sub":"robot","exp":{exp},"iat":{i}}}"#
            ))
        );
        let sig = if alg == "RS256" {
            let mut sig = vec![0; rsa.public_modulus_len()];
            rsa.sign(&RSA_PKCS1_SHA256, &rng, message.as_bytes(), &mut sig)
                .unwrap();
            sig
        } else {
            ec.sign(&rng, message.as_bytes()).unwrap().as_ref().to_vec()
        };
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig))
    };
    let n = 2_000;
    for alg in ["RS256", "ES256"] {
        let fresh: Vec<String> = (0..n + n / 10).map(|i| sign(alg, i)).collect();
        // Each call a token not seen before (the warm-up calls included).
        let mut next = 0;
        let new = per_call(n, |_| {
            black_box(
                rt.block_on(verifier.verify(&fresh[next], &snapshot))
                    .unwrap(),
            );
            next += 1;
        });
        let again = sign(alg, n + n);
        rt.block_on(verifier.verify(&again, &snapshot)).unwrap();
        let remembered = per_call(n, |_| {
            black_box(rt.block_on(verifier.verify(&again, &snapshot)).unwrap());
        });
        let what = format!("verify a token seen before, {alg} (vs a new one)");
        println!(
            "{what:<58} {remembered:>10.0} {new:>10.0} {:>7.3}",
            remembered / new.max(1.0)
        );
        testenv::bench::Figure::new("statement", &what, "ns/op", remembered)
            .against(new.max(1.0))
            .report();
    }
}
