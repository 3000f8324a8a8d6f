//! Masking inside Kubernetes API responses: objects, lists, `Table`s (what `kubectl get`
//! asks for), watch events, and plain-text logs.
//!
//! - Secrets: every value of `data` and `stringData` is replaced (valid base64 of the
//!   replacement in `data`, so clients still decode it), and the
//!   `kubectl.kubernetes.io/last-applied-configuration` annotation, which repeats them, is
//!   replaced whole; unless a grant reveals Secret data.
//! - Every string of every object (ConfigMap data, `env[].value`, Event messages, a
//!   container's termination message, annotations, custom resources, a proxied service's
//!   JSON), but the object's identity (`kind`, `apiVersion`, names, UIDs, versions, times,
//!   labels) and references to other objects (selectors, owner and role references, node
//!   and service-account names), and the values server-side apply records as keys of
//!   `managedFields`: MaskPolicy detectors and patterns. Numbers keep their type and are not
//!   read (typed clients decode them). ConfigMap `binaryData` is decoded first. A Secret's other
//!   annotations are replaced (they can hold anything, as its data can).
//! - MaskPolicy `kubernetes` rules: the listed paths of the listed kinds, whole, also in the
//!   copy the last-applied annotation keeps.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::mask::{MaskSet, Masked};

/// The annotation `kubectl apply` keeps, a copy of the applied object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// What agentgate adds to an object it masked, naming the masked fields.
pub const MASKED_ANNOTATION: &str = "agentgate.dev/masked";
/// What Secret values become (before base64 in `data`).
pub const SECRET_REPLACEMENT: &str = "****";
/// The rule name records give Secret masking.
pub const SECRET_RULE: &str = "agentgate/secret-data";

/// Masks the responses of one request.
pub struct Masker<'a> {
    /// The MaskPolicies for the identity and target.
    pub masks: &'a MaskSet,
    /// Whether Secrets' data passes in clear (a grant reveals it).
    pub reveal_secrets: bool,
    /// The group and kind of the objects the request is about (from its resource), for
    /// objects that do not say (`PartialObjectMetadata` rows of a `Table`).
    pub hint: Option<(String, String)>,
    /// Values masked, by rule.
    pub counts: BTreeMap<String, u64>,
}

/// The group and kind for a few well-known resources (enough to mask `Table` rows, whose
/// objects do not carry their kind).
pub fn kind_of(group: &str, resource: &str) -> Option<(String, String)> {
    let kind = match (group, resource) {
        ("", "secrets") => "Secret",
        ("", "configmaps") => "ConfigMap",
        ("", "pods") => "Pod",
        _ => return None,
    };
    Some((group.to_owned(), kind.to_owned()))
}

fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(g, _)| g)
}

impl Masker<'_> {
    /// Masks one response document (an object, a list, a `Table` or a watch event).
    pub fn document(&mut self, v: &mut Value) {
        let kind = v
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let group = group_of(v.get("apiVersion").and_then(Value::as_str).unwrap_or("")).to_owned();
        // A watch event: {"type": …, "object": …}.
        if kind.is_empty()
            && v.get("type").is_some()
            && let Some(obj) = v.get_mut("object")
        {
            self.document(obj);
            return;
        }
        if kind == "Table" && group == "meta.k8s.io" {
            if let Some(rows) = v.get_mut("rows").and_then(Value::as_array_mut) {
                for row in rows {
                    if let Some(obj) = row.get_mut("object") {
                        self.document(obj);
                    }
                    if let Some(cells) = row.get_mut("cells").and_then(Value::as_array_mut) {
                        for c in cells {
                            self.detect(c);
                        }
                    }
                }
            }
            return;
        }
        // A list only when it says so: an object of a kind with its own `items` field is
        // still that object.
        if kind.ends_with("List")
            && let Some(items) = v.get_mut("items").and_then(Value::as_array_mut)
        {
            let item_kind = kind.strip_suffix("List").unwrap_or("").to_owned();
            // (`PartialObjectMetadataList` items take the request's kind.)
            for item in items {
                self.object(item, &group, &item_kind);
            }
            return;
        }
        self.object(v, &group, &kind);
    }

    /// Masks one item of a list of `group`/`kind` objects, given as its JSON text, into
    /// `out`. Only what masking reads is parsed (the kind, `data`, `stringData`,
    /// `binaryData`, the annotations, fields that may hold an `env`, and the heads of policy
    /// paths); everything else (`managedFields`, `status`, …) is copied as it came. An item
    /// of another shape is masked whole.
    pub fn item_json(
        &mut self,
        raw: &[u8],
        group: &str,
        kind: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), serde_json::Error> {
        let Some(mut lazy) = self.lazy_item(raw, group, kind)? else {
            let mut v: Value = serde_json::from_slice(raw)?;
            self.object(&mut v, group, kind);
            return serde_json::to_writer(out, &v);
        };
        self.object(&mut lazy.parsed, group, kind);
        lazy.write(out)
    }

    /// The fields of an item that masking reads, parsed; `None` when the item must be
    /// parsed whole (not an object, a `metadata` that is not one, a policy path from `*`).
    fn lazy_item<'r>(
        &self,
        raw: &'r [u8],
        group: &str,
        kind: &str,
    ) -> Result<Option<LazyObject<'r>>, serde_json::Error> {
        // Detectors read every string of an item: the item is parsed whole unless they find
        // nothing in its text (which then holds no escape that could hide a value, and the
        // rules have no pattern that could be anchored to a whole value).
        if self.masks.has_value_rules() {
            let clean = self.masks.detectors_only()
                && !raw.contains(&b'\\')
                && std::str::from_utf8(raw)
                    .is_ok_and(|t| matches!(self.masks.mask(None, t).0, Masked::Clear));
            if !clean {
                return Ok(None);
            }
        }
        let Ok(fields) = serde_json::from_slice::<RawFields<'r>>(raw) else {
            return Ok(None);
        };
        let mut parsed = Map::new();
        for k in ["kind", "apiVersion"] {
            if let Some(r) = fields.get(k) {
                parsed.insert(k.to_owned(), serde_json::from_str(r.get())?);
            }
        }
        let mut parsed = Value::Object(parsed);
        let (g, k) = self.resolve(&parsed, group, kind);
        let paths = self.masks.kube_paths(&g, &k);
        let heads: Vec<&str> = paths
            .iter()
            .map(|(_, p)| p.split('.').next().unwrap_or(""))
            .collect();
        if heads.contains(&"*") {
            return Ok(None);
        }
        let mut metadata = None;
        let Some(map) = parsed.as_object_mut() else {
            return Ok(None);
        };
        for (name, r) in fields.unique() {
            let text = r.get();
            let parse = match name {
                "kind" | "apiVersion" => false,
                // The annotations only (the last-applied copy; where the masked-fields note
                // goes), unless a policy path reads metadata.
                "metadata" if !heads.contains(&"metadata") => {
                    let Ok(meta) = serde_json::from_str::<RawFields<'r>>(text) else {
                        return Ok(None);
                    };
                    let mut m = Map::new();
                    if let Some(a) = meta.get("annotations") {
                        m.insert("annotations".to_owned(), serde_json::from_str(a.get())?);
                    }
                    map.insert(name.to_owned(), Value::Object(m));
                    metadata = Some(meta);
                    false
                }
                "data" | "stringData" | "binaryData" => true,
                // `env` can only be under a field whose text names it (a key with an escape
                // in it is parsed too).
                other => heads.contains(&other) || text.contains("\"env\"") || text.contains("\\u"),
            };
            if parse {
                map.insert(name.to_owned(), serde_json::from_str(text)?);
            }
        }
        Ok(Some(LazyObject {
            fields,
            metadata,
            parsed,
        }))
    }

    /// The group and kind an object is masked as: its own, else the request's (for
    /// metadata-only objects: `Table` rows, `as=PartialObjectMetadata`), else the hint.
    fn resolve(&self, obj: &Value, group: &str, kind: &str) -> (String, String) {
        let own_kind = obj.get("kind").and_then(Value::as_str);
        let own_group = obj.get("apiVersion").and_then(Value::as_str).map(group_of);
        let partial = |k: &str| k.starts_with("PartialObjectMetadata");
        match (own_kind, own_group) {
            (Some(k), Some(g)) if !partial(k) => (g.to_owned(), k.to_owned()),
            _ if !kind.is_empty() && !partial(kind) => (group.to_owned(), kind.to_owned()),
            _ => self.hint.clone().unwrap_or_default(),
        }
    }

    /// Masks one object of `group`/`kind` (either may be empty: the object's own or the
    /// request's are used).
    fn object(&mut self, obj: &mut Value, group: &str, kind: &str) {
        let (group, kind) = self.resolve(obj, group, kind);
        let mut masked_fields: Vec<&str> = Vec::new();
        if group.is_empty() && kind == "Secret" && !self.reveal_secrets {
            let replaced = B64.encode(SECRET_REPLACEMENT);
            for (field, value) in [
                ("data", replaced.as_str()),
                ("stringData", SECRET_REPLACEMENT),
            ] {
                if let Some(map) = obj.get_mut(field).and_then(Value::as_object_mut)
                    && !map.is_empty()
                {
                    for v in map.values_mut() {
                        *v = Value::String(value.to_owned());
                        *self.counts.entry(SECRET_RULE.into()).or_default() += 1;
                    }
                    masked_fields.push(field);
                }
            }
            if let Some(a) = annotations(obj) {
                // The last-applied copy repeats the data; other annotations can hold
                // anything (a token, a connection string), as the request side reads them.
                for (key, v) in a.iter_mut() {
                    if key == LAST_APPLIED {
                        *v = Value::String(SECRET_REPLACEMENT.into());
                        *self.counts.entry(SECRET_RULE.into()).or_default() += 1;
                        masked_fields.push("last-applied-configuration");
                    } else if !key.starts_with("kubernetes.io/") && key != MASKED_ANNOTATION {
                        *v = Value::String(SECRET_REPLACEMENT.into());
                        *self.counts.entry(SECRET_RULE.into()).or_default() += 1;
                        masked_fields.push("annotations");
                    }
                }
            }
            // Everything else (labels, a type of its own) as any object's.
            self.leaves(obj, Leaf::Skip(&["data", "stringData", "binaryData"]));
        } else {
            if group.is_empty()
                && kind == "ConfigMap"
                && let Some(map) = obj.get_mut("binaryData").and_then(Value::as_object_mut)
            {
                for v in map.values_mut() {
                    self.detect_base64(v);
                }
            }
            // The last-applied copy is masked by the path rules as the object is.
            self.last_applied_paths(obj, &group, &kind);
            let skip: &[&str] = if group.is_empty() && kind == "Secret" {
                // Data a grant reveals.
                &["data", "stringData", "binaryData"]
            } else {
                &["binaryData"]
            };
            self.leaves(obj, Leaf::Skip(skip));
        }
        if self.mask_paths(obj, &group, &kind) {
            masked_fields.push("policy");
        }
        if !masked_fields.is_empty()
            && let Some(a) = annotations_or_new(obj)
        {
            masked_fields.dedup();
            a.insert(
                MASKED_ANNOTATION.into(),
                Value::String(masked_fields.join(",")),
            );
        }
    }

    /// Applies the policy paths of `group`/`kind` to `obj`; whether any value was masked.
    fn mask_paths(&mut self, obj: &mut Value, group: &str, kind: &str) -> bool {
        let mut any = false;
        for (rule, path) in self.masks.kube_paths(group, kind) {
            let parts: Vec<&str> = path.split('.').collect();
            let secret_data =
                group.is_empty() && kind == "Secret" && parts.first().is_some_and(|p| *p == "data");
            let mut n = 0u64;
            at_path(obj, &parts, &mut |v| {
                let text = match &*v {
                    Value::String(s) if secret_data => B64
                        .decode(s.as_bytes())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_else(|_| s.clone()),
                    Value::String(s) => s.clone(),
                    Value::Null => return,
                    other => other.to_string(),
                };
                *v = match rule.apply_whole(&text) {
                    Masked::Text(t) if secret_data => Value::String(B64.encode(t)),
                    Masked::Text(t) => Value::String(t),
                    Masked::Null if secret_data => Value::String(String::new()),
                    Masked::Null | Masked::Clear => Value::Null,
                };
                n += 1;
            });
            if n > 0 {
                *self.counts.entry(rule.name.clone()).or_default() += n;
                any = true;
            }
        }
        any
    }

    /// The last-applied annotation is a copy of the applied object: where policy paths
    /// apply to the kind, they apply to the copy too (read, masked, written back); a copy
    /// that does not read as an object is replaced whole.
    fn last_applied_paths(&mut self, obj: &mut Value, group: &str, kind: &str) {
        if self.masks.kube_paths(group, kind).is_empty() {
            return;
        }
        let Some(v) = annotations(obj).and_then(|a| a.get_mut(LAST_APPLIED)) else {
            return;
        };
        let copy = v
            .as_str()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
            .filter(Value::is_object);
        let Some(mut copy) = copy else {
            *v = Value::String(SECRET_REPLACEMENT.into());
            return;
        };
        if self.mask_paths(&mut copy, group, kind) {
            // (Replaced as a whole if it cannot be written: never left in clear.)
            *annotations(obj)
                .and_then(|a| a.get_mut(LAST_APPLIED))
                .unwrap_or(&mut Value::Null) = Value::String(
                serde_json::to_string(&copy).unwrap_or_else(|_| SECRET_REPLACEMENT.into()),
            );
        }
    }

    /// Detectors and patterns on every string of `v` but an object's identity: `kind`,
    /// `apiVersion`, and in `metadata` the names, UIDs, versions and times; `managedFields`
    /// are read for the values server-side apply keeps in their keys.
    fn leaves(&mut self, v: &mut Value, how: Leaf<'_>) {
        if !self.masks.has_value_rules() {
            return;
        }
        match v {
            Value::String(_) => self.detect(v),
            Value::Array(items) => {
                for item in items {
                    self.leaves(item, Leaf::All);
                }
            }
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    let k = k.as_str();
                    match (&how, k) {
                        (Leaf::Skip(skip), _) if skip.contains(&k) => {}
                        (Leaf::Metadata, "managedFields") => self.field_keys(child),
                        (Leaf::Metadata, _) if IDENTITY_METADATA.contains(&k) => {}
                        // References and selectors name objects: masked, they would break
                        // the clients that follow them (`kubectl logs deploy/x` reads the
                        // selector); their values are restricted to names anyway.
                        (_, _) if REFERENCES.contains(&k) => {}
                        (_, "kind" | "apiVersion") if child.is_string() => {}
                        (_, "metadata") if child.is_object() => {
                            self.leaves(child, Leaf::Metadata);
                        }
                        _ => self.leaves(child, Leaf::All),
                    }
                }
            }
            _ => {}
        }
    }

    /// The keys of `managedFields` entries' `fieldsV1`, which name list values (`v:"…"`) and
    /// map-list keys (`k:{…}`): masked as values are.
    fn field_keys(&mut self, v: &mut Value) {
        match v {
            Value::Array(items) => items.iter_mut().for_each(|x| self.field_keys(x)),
            Value::Object(map) => {
                let masked: Vec<(String, Option<String>)> = map
                    .keys()
                    .map(|k| {
                        let (m, rules) = self.masks.mask(None, k);
                        for r in rules {
                            *self.counts.entry(r).or_default() += 1;
                        }
                        let m = match m {
                            Masked::Clear => None,
                            Masked::Text(t) => Some(t),
                            Masked::Null => Some(SECRET_REPLACEMENT.to_owned()),
                        };
                        (k.clone(), m)
                    })
                    .collect();
                for (k, m) in masked {
                    if let Some(new) = m
                        && let Some(child) = map.remove(&k)
                    {
                        // Two values masked alike stay two entries.
                        let mut key = new.clone();
                        let mut i = 2;
                        while map.contains_key(&key) {
                            key = format!("{new}#{i}");
                            i += 1;
                        }
                        map.insert(key, child);
                    }
                }
                for child in map.values_mut() {
                    self.field_keys(child);
                }
            }
            _ => {}
        }
    }

    /// Detectors and patterns on one string value.
    fn detect(&mut self, v: &mut Value) {
        if !self.masks.has_value_rules() {
            return;
        }
        if let Value::String(s) = v {
            let (masked, rules) = self.masks.mask(None, s);
            for r in rules {
                *self.counts.entry(r).or_default() += 1;
            }
            match masked {
                Masked::Clear => {}
                Masked::Text(t) => *s = t,
                // A null where clients expect a string would break their decoding.
                Masked::Null => *s = SECRET_REPLACEMENT.to_owned(),
            }
        }
    }

    /// Detectors on a base64 value (ConfigMap `binaryData`), re-encoded when masked.
    fn detect_base64(&mut self, v: &mut Value) {
        if !self.masks.has_value_rules() {
            return;
        }
        if let Value::String(s) = v
            && let Ok(bytes) = B64.decode(s.as_bytes())
        {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let (masked, rules) = self.masks.mask(None, &text);
            for r in rules {
                *self.counts.entry(r).or_default() += 1;
            }
            match masked {
                Masked::Clear => {}
                Masked::Text(t) => *s = B64.encode(t),
                Masked::Null => *s = String::new(),
            }
        }
    }
}

/// How [`Masker::leaves`] reads an object.
enum Leaf<'s> {
    /// Every field.
    All,
    /// Every field but these (the object's top level).
    Skip(&'s [&'s str]),
    /// An object's `metadata`: its identity fields are not values.
    Metadata,
}

/// Fields, anywhere in an object, that name or select other objects rather than hold
/// values (label values and names cannot hold an `@`, and clients follow them).
const REFERENCES: &[&str] = &[
    "selector",
    "nodeSelector",
    "matchLabels",
    "matchExpressions",
    "involvedObject",
    "regarding",
    "related",
    "roleRef",
    "subjects",
    "ownerReferences",
    "nodeName",
    "serviceAccountName",
    "schedulerName",
    "priorityClassName",
    "runtimeClassName",
    "uid",
    "resourceVersion",
];

/// The fields of `metadata` that name the object rather than hold values.
const IDENTITY_METADATA: &[&str] = &[
    "labels",
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "generateName",
    "selfLink",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
    "finalizers",
];

fn annotations(obj: &mut Value) -> Option<&mut Map<String, Value>> {
    obj.get_mut("metadata")?
        .get_mut("annotations")?
        .as_object_mut()
}

fn annotations_or_new(obj: &mut Value) -> Option<&mut Map<String, Value>> {
    let meta = obj
        .as_object_mut()?
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    let a = meta
        .as_object_mut()?
        .entry("annotations")
        .or_insert_with(|| Value::Object(Map::new()));
    if !a.is_object() {
        *a = Value::Object(Map::new());
    }
    a.as_object_mut()
}

/// Calls `f` on every value at a dotted path, `*` matching any key or index.
fn at_path(v: &mut Value, parts: &[&str], f: &mut dyn FnMut(&mut Value)) {
    let Some((head, rest)) = parts.split_first() else {
        f(v);
        return;
    };
    match v {
        Value::Object(map) if *head == "*" => {
            for child in map.values_mut() {
                at_path(child, rest, f);
            }
        }
        Value::Object(map) => {
            if let Some(child) = map.get_mut(*head) {
                at_path(child, rest, f);
            }
        }
        Value::Array(items) if *head == "*" => {
            for child in items {
                at_path(child, rest, f);
            }
        }
        Value::Array(items) => {
            if let Some(child) = head.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                at_path(child, rest, f);
            }
        }
        _ => {}
    }
}

/// An object's fields as they arrived, in order, names borrowed where they have no escapes.
struct RawFields<'r>(Vec<(Cow<'r, str>, &'r RawValue)>);

impl<'r> RawFields<'r> {
    /// A field's raw value (of a repeated name, the last: as when parsed whole).
    fn get(&self, name: &str) -> Option<&'r RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    /// The fields, each name once (its last value).
    fn unique(&self) -> impl Iterator<Item = (&str, &'r RawValue)> {
        self.0.iter().enumerate().filter_map(|(i, (k, v))| {
            (!self.0[i + 1..].iter().any(|(later, _)| later == k)).then_some((k.as_ref(), *v))
        })
    }
}

impl<'de> serde::Deserialize<'de> for RawFields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name<'a>(Cow<'a, str>);
        impl<'de> serde::Deserialize<'de> for Name<'de> {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = Name<'de>;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a field name")
                    }
                    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                        Ok(Name(Cow::Borrowed(v)))
                    }
                    fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                        Ok(Name(Cow::Owned(v.to_owned())))
                    }
                }
                d.deserialize_str(V)
            }
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawFields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawFields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((Name(k), v)) = map.next_entry::<Name<'de>, &'de RawValue>()? {
                    fields.push((k, v));
                }
                Ok(RawFields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// An item parsed only where masking reads it.
struct LazyObject<'r> {
    /// Every field, as it arrived.
    fields: RawFields<'r>,
    /// `metadata`'s fields as they arrived, when only its annotations were parsed.
    metadata: Option<RawFields<'r>>,
    /// The fields masking reads, parsed (and then masked); they replace the raw ones.
    parsed: Value,
}

impl LazyObject<'_> {
    /// Writes the item: parsed fields as masked, the rest as it came, in the order it came.
    fn write(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let Value::Object(parsed) = &self.parsed else {
            return serde_json::to_writer(out, &self.parsed);
        };
        merge(
            &self.fields,
            parsed,
            out,
            &mut |key, value, out| match (key, value, &self.metadata) {
                ("metadata", Value::Object(m), Some(raw)) => {
                    merge(raw, m, out, &mut |_, v, out| serde_json::to_writer(out, v))
                }
                (_, v, _) => serde_json::to_writer(out, v),
            },
        )
    }
}

/// Writes one parsed field's value (given its name).
type WriteField<'a> = dyn FnMut(&str, &Value, &mut Vec<u8>) -> Result<(), serde_json::Error> + 'a;

/// Writes an object of `raw`'s fields, those in `parsed` written by `write` instead, then
/// those `parsed` adds.
fn merge(
    raw: &RawFields<'_>,
    parsed: &Map<String, Value>,
    out: &mut Vec<u8>,
    write: &mut WriteField<'_>,
) -> Result<(), serde_json::Error> {
    out.push(b'{');
    let mut first = true;
    let mut field = |key: &str, out: &mut Vec<u8>| -> Result<(), serde_json::Error> {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key)?;
        out.push(b':');
        Ok(())
    };
    for (key, r) in raw.unique() {
        field(key, out)?;
        match parsed.get(key) {
            Some(v) => write(key, v, out)?,
            None => out.extend_from_slice(r.get().as_bytes()),
        }
    }
    for (key, v) in parsed {
        if raw.get(key).is_none() {
            field(key, out)?;
            write(key, v, out)?;
        }
    }
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use agentgate_crds::MaskPolicy;
    use serde_json::json;

    fn masks(yaml: &str) -> MaskSet {
        let p: MaskPolicy = serde_norway::from_str(yaml).unwrap();
        MaskSet::compile(&[&p], &|_| None).unwrap()
    }

    fn emails() -> MaskSet {
        masks(
            "apiVersion: agentgate.dev/v1alpha1\nkind: MaskPolicy\nmetadata: {name: pii}\nspec:\n  rules:\n  - {name: emails, detectors: [Email], action: Redact}\n  - name: tokens\n    kubernetes: [{kind: Widget, apiGroup: example.com, paths: [spec.token, spec.items.*.key]}]\n    action: Partial\n    keepLast: 2\n",
        )
    }

    fn run(m: &MaskSet, v: &mut Value, reveal: bool) -> BTreeMap<String, u64> {
        let mut masker = Masker {
            masks: m,
            reveal_secrets: reveal,
            hint: Some(("".into(), "Secret".into())),
            counts: BTreeMap::new(),
        };
        masker.document(v);
        masker.counts
    }

    #[test]
    fn secrets_in_objects_lists_tables_and_events() {
        let m = emails();
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "annotations": {LAST_APPLIED: "{\"data\":{\"password\":\"aHVudGVyMg==\"}}"}}, "data": {"password": "aHVudGVyMg=="}, "type": "Opaque"});
        let mut one = secret.clone();
        let counts = run(&m, &mut one, false);
        assert_eq!(one["data"]["password"], "KioqKg==");
        assert_eq!(one["metadata"]["annotations"][LAST_APPLIED], "****");
        assert_eq!(
            one["metadata"]["annotations"][MASKED_ANNOTATION],
            "data,last-applied-configuration"
        );
        assert_eq!(counts[SECRET_RULE], 2);
        let mut list = json!({"apiVersion": "v1", "kind": "SecretList", "items": [{"metadata": {"name": "a"}, "data": {"k": "c2VjcmV0"}}]});
        run(&m, &mut list, false);
        assert_eq!(list["items"][0]["data"]["k"], "KioqKg==");
        let mut event = json!({"type": "ADDED", "object": secret.clone()});
        run(&m, &mut event, false);
        assert_eq!(event["object"]["data"]["password"], "KioqKg==");
        let mut table = json!({"apiVersion": "meta.k8s.io/v1", "kind": "Table", "rows": [{"cells": ["db", "Opaque", 1, "1m"], "object": {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": "db", "annotations": {LAST_APPLIED: "{\"data\":{\"password\":\"aHVudGVyMg==\"}}"}}}}]});
        run(&m, &mut table, false);
        assert_eq!(
            table["rows"][0]["object"]["metadata"]["annotations"][LAST_APPLIED],
            "****"
        );
        let mut revealed = secret.clone();
        run(&m, &mut revealed, true);
        assert_eq!(revealed["data"]["password"], "aHVudGVyMg==");
    }

    #[test]
    fn detectors_on_configmaps_env_and_policy_paths() {
        let m = emails();
        let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"owner": "ops: alice@example.com", "size": "3"}, "binaryData": {"b": B64.encode("bob@example.com")}});
        let counts = run(&m, &mut cm, false);
        assert_eq!(cm["data"]["owner"], "ops: ****");
        assert_eq!(cm["data"]["size"], "3");
        assert_eq!(cm["binaryData"]["b"], B64.encode("****"));
        assert_eq!(counts["pii/emails"], 2);
        let mut deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": {"spec": {"containers": [{"name": "x", "env": [{"name": "ADMIN", "value": "root@example.com"}, {"name": "N", "value": "1"}]}]}}}});
        run(&m, &mut deploy, false);
        assert_eq!(
            deploy["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"],
            "****"
        );
        assert_eq!(
            deploy["spec"]["template"]["spec"]["containers"][0]["env"][1]["value"],
            "1"
        );
        let mut widget = json!({"apiVersion": "example.com/v1", "kind": "Widget", "spec": {"token": "abcdef", "items": [{"key": "123456"}]}});
        run(&m, &mut widget, false);
        assert_eq!(widget["spec"]["token"], "****ef");
        assert_eq!(widget["spec"]["items"][0]["key"], "****56");
        assert_eq!(
            widget["metadata"]["annotations"][MASKED_ANNOTATION],
            "policy"
        );
    }

    #[test]
    fn every_value_of_every_object_but_its_identity() {
        let m = emails();
        // An Event's message, a termination message, annotations, a custom resource's spec
        // (a number too), a proxied service's JSON (no kind at all).
        let mut event = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "alice@example.com.17a", "annotations": {"by": "bob@example.com"}}, "message": "probe failed for carol@example.com", "count": 2});
        run(&m, &mut event, false);
        assert_eq!(event["message"], "probe failed for ****");
        assert_eq!(event["metadata"]["annotations"]["by"], "****");
        assert_eq!(
            event["metadata"]["name"], "alice@example.com.17a",
            "names are identity"
        );
        assert_eq!(event["count"], 2);
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "args": ["--admin=dana@example.com"]}]}, "status": {"containerStatuses": [{"state": {"terminated": {"message": "owner erin@example.com"}}}]}});
        run(&m, &mut pod, false);
        assert_eq!(pod["spec"]["containers"][0]["args"][0], "--admin=****");
        assert_eq!(
            pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"],
            "owner ****"
        );
        let cards = masks(
            "apiVersion: agentgate.dev/v1alpha1\nkind: MaskPolicy\nmetadata: {name: pci}\nspec:\n  rules:\n  - {name: cards, detectors: [CardNumber], action: Redact}\n",
        );
        // Strings only: a number keeps its type (typed clients decode it; a 13-digit
        // timestamp can pass a card check).
        let mut custom = json!({"apiVersion": "shop.io/v1", "kind": "Order", "metadata": {"name": "o", "labels": {"tenant": "4111111111111111"}}, "spec": {"card": "4111111111111111", "createdAtMs": 4111111111111111u64, "selector": {"matchLabels": {"tenant": "4111111111111111"}}}});
        run(&cards, &mut custom, false);
        assert_eq!(custom["spec"]["card"], "****");
        assert_eq!(custom["spec"]["createdAtMs"], 4111111111111111u64);
        assert_eq!(custom["metadata"]["labels"]["tenant"], "4111111111111111");
        assert_eq!(
            custom["spec"]["selector"]["matchLabels"]["tenant"],
            "4111111111111111"
        );
        let mut proxied = json!([{"user": "frank@example.com", "id": 7}]);
        Masker {
            masks: &m,
            reveal_secrets: false,
            hint: None,
            counts: BTreeMap::new(),
        }
        .document(&mut proxied);
        assert_eq!(proxied[0]["user"], "****");
        // Server-side apply keeps list values in managedFields' keys.
        let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:owners": {"v:\"gina@example.com\"": {}}}}}]}});
        run(&m, &mut cm, false);
        let keys = cm["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:owners"].to_string();
        assert!(!keys.contains("gina@") && keys.contains("****"), "{keys}");
        let mut two = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "managedFields": [{"fieldsV1": {"f:owners": {"v:\"a@x.com\"": {}, "v:\"b@x.com\"": {}}}}]}});
        run(&m, &mut two, false);
        let owners = &two["metadata"]["managedFields"][0]["fieldsV1"]["f:owners"];
        assert_eq!(owners.as_object().unwrap().len(), 2, "{owners}");
        // A Secret's annotations can hold anything: replaced, but Kubernetes' own.
        let mut secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "annotations": {"db-url": "postgres://u:pw@h/db", "kubernetes.io/service-account.name": "robot"}}, "data": {}});
        run(&m, &mut secret, false);
        assert_eq!(secret["metadata"]["annotations"]["db-url"], "****");
        assert_eq!(
            secret["metadata"]["annotations"]["kubernetes.io/service-account.name"],
            "robot"
        );
        // Path rules apply to the last-applied copy as to the object.
        let applied =
            r#"{"apiVersion":"example.com/v1","kind":"Widget","spec":{"token":"abcdef"}}"#;
        let mut widget = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "annotations": {LAST_APPLIED: applied}}, "spec": {"token": "abcdef"}});
        run(&m, &mut widget, false);
        let copy = widget["metadata"]["annotations"][LAST_APPLIED]
            .as_str()
            .unwrap();
        assert!(
            !copy.contains("abcdef") && copy.contains("****ef"),
            "{copy}"
        );
        let mut broken = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "annotations": {LAST_APPLIED: "{not json abcdef"}}, "spec": {}});
        run(&m, &mut broken, false);
        assert_eq!(broken["metadata"]["annotations"][LAST_APPLIED], "****");
    }

    #[test]
    fn list_items_parsed_lazily_mask_exactly_as_parsed_whole() {
        let policy = masks(
            "apiVersion: agentgate.dev/v1alpha1\nkind: MaskPolicy\nmetadata: {name: pii}\nspec:\n  rules:\n  - {name: emails, detectors: [Email], action: Redact}\n  - name: tokens\n    kubernetes: [{kind: Widget, apiGroup: example.com, paths: [spec.token, metadata.labels.owner]}, {kind: Gadget, apiGroup: '*', paths: ['*.key']}]\n    action: Partial\n    keepLast: 2\n",
        );
        let applied =
            r#"{\"apiVersion\":\"v1\",\"data\":{\"pw\":\"aHVudGVyMg==\"},\"kind\":\"Secret\"}"#;
        let items = [
            // Secrets: data, stringData, the last-applied copy; with and without metadata.
            format!(
                r#"{{"kind":"Secret","apiVersion":"v1","metadata":{{"name":"s","managedFields":[{{"manager":"m","fieldsV1":{{"f:data":{{}}}}}}],"annotations":{{"kubectl.kubernetes.io/last-applied-configuration":"{applied}","a":"b"}}}},"data":{{"pw":"aHVudGVyMg=="}},"stringData":{{"x":"y"}},"type":"Opaque"}}"#
            ),
            r#"{"kind":"Secret","apiVersion":"v1","data":{"pw":"aHVudGVyMg=="}}"#.to_owned(),
            r#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"empty"},"data":{}}"#
                .to_owned(),
            // ConfigMaps: detectors on data and binaryData, numbers kept as they came.
            r#"{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"c","resourceVersion":"1e3","labels":{"n":"1"}},"data":{"owner":"ops: alice@example.com","n":"3"},"binaryData":{"b":"Ym9iQGV4YW1wbGUuY29t"}}"#.to_owned(),
            r#"{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"clean"},"data":{"n":"3"}}"#.to_owned(),
            // env values under any field; a key spelled with an escape.
            r#"{"kind":"Deployment","apiVersion":"apps/v1","metadata":{"name":"d"},"spec":{"template":{"spec":{"containers":[{"name":"x","env":[{"name":"A","value":"root@example.com"}]}]}}},"status":{"replicas":1}}"#.to_owned(),
            r#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":"p"},"spec":{"containers":[{"\u0065nv":[{"name":"A","value":"eve@example.com"}]}]}}"#.to_owned(),
            r#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":"p"},"spec":{"containers":[{"name":"x","env":[{"name":"A","value":"1"}]}]}}"#.to_owned(),
            // Policy paths: one from metadata, one from any field.
            r#"{"kind":"Widget","apiVersion":"example.com/v1","metadata":{"name":"w","labels":{"owner":"abcdef"}},"spec":{"token":"123456"}}"#.to_owned(),
            r#"{"kind":"Gadget","apiVersion":"other.io/v1","spec":{"key":"123456"},"status":{"key":"654321"}}"#.to_owned(),
            // Odd shapes: metadata not an object, a repeated key, no kind (the request's).
            r#"{"kind":"ConfigMap","apiVersion":"v1","metadata":null,"data":{"o":"x@example.com"}}"#.to_owned(),
            r#"{"kind":"Secret","apiVersion":"v1","data":{"a":"YQ=="},"data":{"b":"Yg=="}}"#.to_owned(),
            r#"{"metadata":{"name":"partial","annotations":{"note":"mail bob@example.com"}}}"#.to_owned(),
            // Values anywhere: a termination message, a value behind an escape.
            r#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":"t"},"status":{"containerStatuses":[{"state":{"terminated":{"message":"dana@example.com"}}}]}}"#.to_owned(),
            r#"{"kind":"Event","apiVersion":"v1","metadata":{"name":"e"},"message":"probe: erin\u0040example.com"}"#.to_owned(),
        ];
        for reveal in [false, true] {
            for raw in &items {
                for (group, kind) in [("", "Secret"), ("", "ConfigMap"), ("", "")] {
                    let mut whole: Value = serde_json::from_str(raw).unwrap();
                    let mut a = Masker {
                        masks: &policy,
                        reveal_secrets: reveal,
                        hint: None,
                        counts: BTreeMap::new(),
                    };
                    a.object(&mut whole, group, kind);
                    let mut b = Masker {
                        masks: &policy,
                        reveal_secrets: reveal,
                        hint: None,
                        counts: BTreeMap::new(),
                    };
                    let mut out = Vec::new();
                    b.item_json(raw.as_bytes(), group, kind, &mut out).unwrap();
                    let lazy: Value = serde_json::from_slice(&out).unwrap();
                    assert_eq!(lazy, whole, "{raw} as {kind:?}, reveal {reveal}");
                    assert_eq!(a.counts, b.counts, "{raw}");
                }
            }
        }
        // What is not read is copied as it came.
        let mut m = Masker {
            masks: &policy,
            reveal_secrets: false,
            hint: None,
            counts: BTreeMap::new(),
        };
        let mut out = Vec::new();
        m.item_json(items[3].as_bytes(), "", "", &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""resourceVersion":"1e3""#), "{text}");
        assert!(text.contains(r#""owner":"ops: ****""#), "{text}");
    }
}
