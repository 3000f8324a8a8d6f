//! Agents authenticate with tokens from an identity provider users run: Keycloak (from Maven
//! Central), over HTTPS. Its tokens are verified against its discovery document and JWKS,
//! mapped to exactly one AgentIdentity (by subject, or by claims), and refused with a reason
//! when the audience, the signature or the algorithm is wrong; a key rotation in Keycloak is
//! picked up without restarting the sidecar.

#![allow(clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine;
use serde_json::json;
use testenv::keycloak_env::KeycloakEnv;
use testenv::process::{Proc, Spec, free_port};
use testenv::{Parts, TestEnv};

const ROBOT: &str = "11111111-1111-4111-8111-111111111111";
const OTHER: &str = "22222222-2222-4222-8222-222222222222";

fn realm() -> serde_json::Value {
    let scopes = json!([
        "basic",
        "acr",
        "roles",
        "profile",
        "email",
        "web-origins",
        "service_account"
    ]);
    json!({
        "id": "agents", "realm": "agents", "enabled": true, "accessTokenLifespan": 300,
        "users": [
            { "username": "service-account-agent-robot", "id": ROBOT, "enabled": true, "serviceAccountClientId": "agent-robot" },
            { "username": "service-account-other-robot", "id": OTHER, "enabled": true, "serviceAccountClientId": "other-robot" },
            { "username": "alice", "enabled": true, "email": "alice@example.test", "emailVerified": true,
              "firstName": "Alice", "lastName": "Agent",
              "credentials": [ { "type": "password", "value": "alice-password", "temporary": false } ] }
        ],
        "clients": [
            { "clientId": "agent-robot", "enabled": true, "protocol": "openid-connect", "publicClient": false,
              "clientAuthenticatorType": "client-secret", "secret": "agent-robot-secret",
              "serviceAccountsEnabled": true, "standardFlowEnabled": false, "directAccessGrantsEnabled": true,
              "fullScopeAllowed": false, "defaultClientScopes": scopes,
              "protocolMappers": [ { "name": "audience-agentgate", "protocol": "openid-connect",
                  "protocolMapper": "oidc-audience-mapper",
                  "config": { "included.custom.audience": "agentgate", "access.token.claim": "true", "id.token.claim": "true" } } ] },
            { "clientId": "other-robot", "enabled": true, "protocol": "openid-connect", "publicClient": false,
              "clientAuthenticatorType": "client-secret", "secret": "other-robot-secret",
              "serviceAccountsEnabled": true, "standardFlowEnabled": false, "fullScopeAllowed": false,
              "defaultClientScopes": scopes }
        ]
    })
}

fn policy(pg_port: u16, issuer: &str) -> String {
    format!(
        r#"
apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: db }}
spec:
  protocol: Postgres
  postgres: {{ host: 127.0.0.1, port: {pg_port}, database: app, tls: {{ mode: VerifyFull, ca: {{ name: c, key: ca.crt }} }}, credentials: {{ name: c }} }}
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: robot }}
spec:
  owner: team-orders
  authentication: {{ oidc: {{ issuer: "{issuer}", audience: agentgate, subject: "{ROBOT}" }} }}
  baseline: [ {{ target: db, scope: {{ operations: [Read] }} }} ]
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: alice-assistant }}
spec:
  owner: alice
  authentication: {{ oidc: {{ issuer: "{issuer}", audience: agentgate, claims: {{ preferred_username: alice }} }} }}
"#
    )
}

fn psql(env: &TestEnv, port: u16, token: &str, sql: &str) -> Output {
    Command::new(env.bins.pg_bin.join("psql"))
        .arg(format!(
            "host=127.0.0.1 port={port} dbname=db user=agent sslmode=disable"
        ))
        .args(["-X", "-At", "-c", sql])
        .env("PGPASSWORD", token)
        .output()
        .expect("run psql")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

fn client_token(
    kc: &KeycloakEnv,
    client: &str,
    secret: &str,
    scope: Option<&str>,
) -> serde_json::Value {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", client),
        ("client_secret", secret),
    ];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    kc.token("agents", &form).expect("a token from Keycloak")
}

fn start_sidecar(
    env: &TestEnv,
    policy_dir: &Path,
    targets: &Path,
    ca: &Path,
) -> anyhow::Result<(Proc, u16)> {
    let port = free_port()?;
    let spec = Spec::new("sidecar", env!("CARGO_BIN_EXE_agentgate-sidecar"))
        .args([
            format!("--policy-dir={}", policy_dir.display()),
            "--pg-auth=token".into(),
            format!("--oidc-ca-file={}", ca.display()),
            // Keys are read again once this old (at most every ten seconds): a withdrawn key
            // stops being trusted within seconds here.
            "--oidc-keys-max-age=2s".into(),
            format!("--targets-dir={}", targets.display()),
            format!("--pg-addr=127.0.0.1:{port}"),
            "--kube-addr=127.0.0.1:0".into(),
            "--ssh-addr=127.0.0.1:0".into(),
            format!(
                "--audit-dir={}",
                env.dir().join(format!("audit-{port}")).display()
            ),
        ])
        .env("RUST_LOG", "info,agentgate_sidecar=debug");
    let mut proc = Proc::start(spec, &env.dir().join("logs"))?;
    testenv::process::wait_listening(&mut proc, port, Duration::from_secs(20))?;
    Ok((proc, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_keycloak() -> anyhow::Result<()> {
    let env = TestEnv::start_async(Parts {
        postgres: true,
        ..Default::default()
    })
    .await?;
    let env = std::sync::Arc::new(env);
    let kc = {
        let env = env.clone();
        tokio::task::spawn_blocking(move || KeycloakEnv::start(&env)).await??
    };
    kc.create_realm(&realm())?;
    let issuer = kc.issuer("agents");

    let pg = env.postgres()?;
    pg.psql_run(
        "app",
        "CREATE TABLE orders (id int PRIMARY KEY, state text); INSERT INTO orders VALUES (4711, 'paid');
         GRANT ALL ON ALL TABLES IN SCHEMA public TO agentgate;",
    )?;
    let policy_dir = tempfile::tempdir()?;
    std::fs::write(policy_dir.path().join("p.yaml"), policy(pg.port(), &issuer))?;
    let targets = tempfile::tempdir()?;
    pg.write_credentials(targets.path(), "db", "agentgate")?;
    let (sidecar, port) = start_sidecar(&env, policy_dir.path(), targets.path(), &kc.ca_path())?;

    // A service account's access token (client credentials) maps to `robot` by subject.
    let robot = client_token(&kc, "agent-robot", "agent-robot-secret", None);
    let access = robot["access_token"].as_str().expect("access_token");
    let mut ok = psql(&env, port, access, "SELECT state FROM orders");
    for _ in 0..50 {
        if ok.status.success() {
            break;
        }
        // The policy folder is loaded within a second of start.
        tokio::time::sleep(Duration::from_millis(200)).await;
        ok = psql(&env, port, access, "SELECT state FROM orders");
    }
    assert!(
        ok.status.success(),
        "{}\n{}",
        text(&ok),
        sidecar.log_tail(20)
    );
    assert_eq!(text(&ok), "paid");
    assert!(
        sidecar.log_contains(&format!("identity=robot issuer={issuer} subject={ROBOT}")),
        "{}",
        sidecar.log_tail(20)
    );

    // Its ID token (scope openid, audience [agent-robot, agentgate]) works too.
    let with_id = client_token(&kc, "agent-robot", "agent-robot-secret", Some("openid"));
    let id_token = with_id["id_token"].as_str().expect("id_token");
    assert_eq!(text(&psql(&env, port, id_token, "SELECT 1")), "1");

    // A person's token (password grant) maps to a different identity by its claims, whose
    // policy is its own: no baseline, so reads are held.
    let alice = kc
        .token(
            "agents",
            &[
                ("grant_type", "password"),
                ("client_id", "agent-robot"),
                ("client_secret", "agent-robot-secret"),
                ("username", "alice"),
                ("password", "alice-password"),
            ],
        )
        .expect("alice's token");
    let out = psql(
        &env,
        port,
        alice["access_token"].as_str().expect("token"),
        "SELECT state FROM orders",
    );
    assert!(
        text(&out).contains("no baseline or active grant allows Read on db"),
        "{}",
        text(&out)
    );
    assert!(sidecar.log_contains("identity=alice-assistant"));

    // Another client's access token carries no audience at all; its ID token is only for
    // itself: refused either way, saying why.
    let other = client_token(&kc, "other-robot", "other-robot-secret", Some("openid"));
    let out = psql(
        &env,
        port,
        other["access_token"].as_str().expect("token"),
        "SELECT 1",
    );
    assert!(
        text(&out).contains("invalid token: Missing required claim: aud"),
        "{}",
        text(&out)
    );
    let out = psql(
        &env,
        port,
        other["id_token"].as_str().expect("token"),
        "SELECT 1",
    );
    assert!(
        text(&out).contains(&format!(
            "no AgentIdentity matches subject {OTHER} of issuer {issuer}"
        )),
        "{}",
        text(&out)
    );

    // Tampered (the payload changed, the signature kept), alg none, and not a token at all.
    let parts: Vec<&str> = access.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1])?)?;
    claims["sub"] = json!("33333333-3333-4333-8333-333333333333");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(claims.to_string()),
        parts[2]
    );
    let out = psql(&env, port, &tampered, "SELECT 1");
    assert!(text(&out).contains("invalid token"), "{}", text(&out));
    let none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    let out = psql(&env, port, &none, "SELECT 1");
    assert!(
        text(&out).contains("token algorithm none is not accepted"),
        "{}",
        text(&out)
    );
    let out = psql(&env, port, "hunter2", "SELECT 1");
    assert!(
        text(&out).contains("the password is not a token"),
        "{}",
        text(&out)
    );
    assert!(
        !std::fs::read_to_string(sidecar.log_path())?.contains(access),
        "tokens never reach the log"
    );

    // Key rotation: Keycloak starts signing with a new key; the sidecar fetches the JWKS
    // again for the unknown key id and goes on.
    kc.admin(
        "POST",
        "/realms/agents/components",
        Some(&json!({
            "name": "rotated", "providerId": "rsa-generated", "providerType": "org.keycloak.keys.KeyProvider",
            "parentId": "agents",
            "config": { "priority": ["500"], "keySize": ["2048"], "active": ["true"], "enabled": ["true"], "algorithm": ["RS256"] }
        })),
    )?;
    let rotated = client_token(&kc, "agent-robot", "agent-robot-secret", None);
    let rotated = rotated["access_token"].as_str().expect("token");
    let kid = |t: &str| -> anyhow::Result<String> {
        let h: serde_json::Value =
            serde_json::from_slice(&b64.decode(t.split('.').next().unwrap_or_default())?)?;
        Ok(h["kid"].as_str().unwrap_or_default().to_owned())
    };
    assert_ne!(
        kid(rotated)?,
        kid(access)?,
        "Keycloak signs with the new key"
    );
    // The verifier refetches keys for an unknown kid at most every ten seconds.
    let mut out = psql(&env, port, rotated, "SELECT 2");
    for _ in 0..30 {
        if out.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        out = psql(&env, port, rotated, "SELECT 2");
    }
    assert_eq!(text(&out), "2");

    // A withdrawn key: the realm's original signing key is deleted in Keycloak. A token it
    // signed (still within its lifetime, verified and remembered before) is refused once the
    // sidecar reads the issuer's keys again; the new key's tokens go on working.
    assert_eq!(text(&psql(&env, port, access, "SELECT 3")), "3");
    let providers: serde_json::Value = serde_json::from_str(&kc.admin(
        "GET",
        "/realms/agents/components?type=org.keycloak.keys.KeyProvider",
        None,
    )?)?;
    let original: Vec<String> = providers
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["providerId"] == "rsa-generated" && c["name"] != "rotated")
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .collect();
    assert!(!original.is_empty(), "{providers}");
    for id in &original {
        kc.admin("DELETE", &format!("/realms/agents/components/{id}"), None)?;
    }
    let mut out = psql(&env, port, access, "SELECT 4");
    for _ in 0..30 {
        if !out.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        out = psql(&env, port, access, "SELECT 4");
    }
    assert!(
        text(&out).contains(&format!(
            "the token was signed with a key issuer {issuer} does not publish"
        )),
        "{}",
        text(&out)
    );
    assert_eq!(text(&psql(&env, port, rotated, "SELECT 5")), "5");
    drop(kc);
    Ok(())
}
