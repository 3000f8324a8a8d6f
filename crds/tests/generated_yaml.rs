//! The committed CRD YAML is exactly what the types generate, and every field is documented.

use std::path::Path;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let files = agentgate_crds::generate::render_all().expect("the CRDs render");
    assert_eq!(files.len(), 5);
    let mut stale = Vec::new();
    for (name, yaml) in &files {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        if committed != *yaml {
            stale.push(name.clone());
        }
    }
    let on_disk = std::fs::read_dir(&dir)
        .expect("crds/manifests exists")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        .count();
    assert!(
        stale.is_empty() && on_disk == files.len(),
        "crds/manifests is stale ({stale:?}, {on_disk} files on disk): run \
         `cargo run -p agentgate-crds --features crdgen --bin crdgen`"
    );
}

#[test]
fn every_schema_field_has_a_description() {
    // Every property of every CRD schema carries a description: they become `kubectl explain`.
    fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
            for (k, child) in props {
                let p = format!("{path}.{k}");
                let skip = matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
                    || path.ends_with(".conditions[]");
                if !skip && child.get("description").is_none() {
                    missing.push(p.clone());
                }
                walk(&p, child, missing);
            }
        }
        if let Some(items) = v.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in agentgate_crds::generate::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("serializes");
        walk(
            &crd.spec.names.kind,
            &schema["openAPIV3Schema"],
            &mut missing,
        );
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
}

#[test]
fn committed_record_schema_matches_the_type() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(agentgate_crds::generate::RECORD_SCHEMA_FILE);
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let schema = agentgate_crds::generate::record_schema().expect("the schema renders");
    assert!(
        committed == schema,
        "{} is stale: run `cargo run -p agentgate-crds --features crdgen --bin crdgen`",
        path.display()
    );
    // Every field is documented: the schema is the record's reference.
    let value: serde_json::Value = serde_json::from_str(&schema).expect("JSON");
    let props = value["properties"].as_object().expect("properties");
    for (name, p) in props {
        assert!(
            p.get("description").is_some() || p.get("$ref").is_some() || p.get("anyOf").is_some(),
            "field {name} has no description"
        );
    }
}
