//! The Kubernetes gateway against the API server directly, in one run, printed as ratios:
//! listing 5,000 ConfigMaps (every one with a value the email detector masks) and a loop of
//! GETs. Runs alternate (direct, gateway, …); medians are kept.
//! `cargo bench -p agentgate-sidecar --bench kube` (`AGENTGATE_BENCH_OBJECTS`,
//! `AGENTGATE_BENCH_ROUNDS` and `AGENTGATE_BENCH_GETS` tune it).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ListParams, PostParams};
use testenv::process::{Proc, Spec, free_port};
use testenv::{Parts, TestEnv};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    testenv::install_crypto_provider();
    let objects = env_or("AGENTGATE_BENCH_OBJECTS", 5000);
    let rounds = env_or("AGENTGATE_BENCH_ROUNDS", 5);
    let gets = env_or("AGENTGATE_BENCH_GETS", 500);
    let env = TestEnv::start_async(Parts {
        kube: true,
        ..Default::default()
    })
    .await?;
    let kube = env.kube()?;
    let dir = tempfile::tempdir()?;
    let targets = dir.path().join("targets");
    let cluster = kube
        .gateway_target(
            "bench",
            &[r#"{ apiGroups: [""], resources: [configmaps], verbs: [get, list, watch] }"#],
            &targets,
            "cluster",
        )
        .await?;
    kube.kubectl_run(&["create", "namespace", "bench"])?;
    let admin = kube.client().await?;
    let direct: Api<ConfigMap> = Api::namespaced(admin.clone(), "bench");
    println!("creating {objects} ConfigMaps…");
    futures::stream::iter(0..objects)
        .map(|i| {
            let api = direct.clone();
            async move {
                let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                    "metadata": { "name": format!("cm-{i:05}") },
                    "data": {
                        "owner": format!("team-{i}@example.com"),
                        "settings.yaml": "replicas: 3\nimage: registry.example.com/app:1.2.3\nlog: info\n",
                    }
                }))
                .unwrap();
                api.create(&PostParams::default(), &cm).await.map(|_| ())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;

    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy)?;
    std::fs::write(
        policy.join("policy.yaml"),
        format!(
            r#"apiVersion: agentgate.dev/v1alpha1
kind: Target
metadata: {{ name: cluster }}
spec:
  protocol: Kubernetes
  kubernetes: {cluster}
---
apiVersion: agentgate.dev/v1alpha1
kind: AgentIdentity
metadata: {{ name: bench }}
spec: {{ owner: bench, authentication: {{ serviceAccount: {{ name: bench }} }}, baseline: [ {{ target: cluster, scope: {{ operations: [Read] }} }} ] }}
---
apiVersion: agentgate.dev/v1alpha1
kind: MaskPolicy
metadata: {{ name: pii }}
spec: {{ rules: [ {{ name: emails, detectors: [Email, CardNumber], action: Redact }} ] }}
"#
        ),
    )?;
    // Direct, as the agent would be without the gateway: the same credential, user and RBAC
    // (the gateway's token, impersonating the agent's user), straight to the API server.
    let token = std::fs::read_to_string(targets.join("cluster/token"))?;
    let as_agent = kube.kubeconfig_with_token("direct-agent", token.trim())?;
    let text = std::fs::read_to_string(&as_agent)?.replace(
        "    token: ",
        "    as: agentgate:agent:bench\n    as-groups: [agentgate:agents]\n    token: ",
    );
    std::fs::write(&as_agent, text)?;
    let direct: Api<ConfigMap> = Api::namespaced(kube.client_from(&as_agent).await?, "bench");
    let client_dir = dir.path().join("client");
    let spec = Spec::new("sidecar", env!("CARGO_BIN_EXE_agentgate-sidecar"))
        .args([
            format!("--policy-dir={}", policy.display()),
            "--identity=bench".into(),
            format!("--targets-dir={}", targets.display()),
            format!("--pg-addr=127.0.0.1:{}", free_port()?),
            format!("--kube-addr=127.0.0.1:{}", free_port()?),
            "--ssh-addr=127.0.0.1:0".into(),
            format!("--client-dir={}", client_dir.display()),
            format!("--audit-dir={}", dir.path().join("audit").display()),
        ])
        .env("RUST_LOG", "warn");
    let _sidecar = Proc::start(spec, &env.dir().join("logs"))?;
    let kubeconfig = client_dir.join("kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kubeconfig.exists() {
        anyhow::ensure!(Instant::now() < deadline, "the sidecar wrote no kubeconfig");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gateway: Api<ConfigMap> = Api::namespaced(kube.client_from(&kubeconfig).await?, "bench");
    // Both warm (connections, discovery), and the gateway masks what it should.
    let first = gateway.get("cm-00000").await?;
    assert_eq!(first.data.unwrap()["owner"], "****");
    direct.get("cm-00000").await?;

    println!(
        "Kubernetes API, median of {rounds} alternating rounds; direct: the agent's user (impersonated) straight to the API server; gateway: authorization, impersonation, masking (email detector on every ConfigMap), audit"
    );
    let (mut d_list, mut g_list) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (api, out) in [(&direct, &mut d_list), (&gateway, &mut g_list)] {
            let t = Instant::now();
            let l = api.list(&ListParams::default()).await?;
            assert_eq!(l.items.len(), objects);
            out.push(t.elapsed().as_secs_f64());
        }
    }
    let per_round: Vec<f64> = d_list.iter().zip(&g_list).map(|(d, g)| d / g).collect();
    let (_, lo, hi) = testenv::bench::median_spread(&per_round);
    let (d, g) = (median(d_list), median(g_list));
    // As throughput (lists per second), so the ratio reads like the others.
    testenv::bench::Figure::new(
        "kubernetes",
        &format!("list {objects} ConfigMaps (masked)"),
        "lists/s",
        1.0 / g,
    )
    .against(1.0 / d)
    .spread(lo, hi)
    .target("≥ 0.9", d / g >= 0.9)
    .report();
    println!(
        "list {objects} ConfigMaps: direct {:.0} ms, gateway {:.0} ms, throughput ratio {:.2}",
        d * 1000.0,
        g * 1000.0,
        d / g
    );
    let (mut d_get, mut g_get) = (Vec::new(), Vec::new());
    for i in 0..gets {
        let name = format!("cm-{:05}", i % objects);
        for (api, out) in [(&direct, &mut d_get), (&gateway, &mut g_get)] {
            let t = Instant::now();
            api.get(&name).await?;
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let (d_total, g_total): (f64, f64) = (d_get.iter().sum(), g_get.iter().sum());
    // Spread: the throughput ratio of each tenth of the loop.
    let tenth = (gets / 10).max(1);
    let parts: Vec<f64> = d_get
        .chunks(tenth)
        .zip(g_get.chunks(tenth))
        .map(|(d, g)| d.iter().sum::<f64>() / g.iter().sum::<f64>())
        .collect();
    let (_, lo, hi) = testenv::bench::median_spread(&parts);
    let (d50, g50) = (median(d_get.clone()), median(g_get.clone()));
    testenv::bench::Figure::new(
        "kubernetes",
        &format!("GET loop ({gets} GETs)"),
        "GETs/s",
        gets as f64 / (g_total / 1e6),
    )
    .against(gets as f64 / (d_total / 1e6))
    .spread(lo, hi)
    .target("≥ 0.9", d_total / g_total >= 0.9)
    .report();
    testenv::bench::Figure::new("kubernetes", "GET: added latency", "µs p50", g50 - d50)
        .target("≤ 1000 µs", g50 - d50 <= 1000.0)
        .report();
    println!(
        "GET loop ({gets} each): direct p50 {d50:.0} µs, gateway p50 {g50:.0} µs, added p50 {:.0} µs, throughput ratio {:.2}",
        g50 - d50,
        d_total / g_total
    );
    Ok(())
}
