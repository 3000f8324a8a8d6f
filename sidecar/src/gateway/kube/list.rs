//! Masking a list as it arrives: the API server writes a list as its type and metadata, then
//! `"items":[…]` last. The splitter passes the head, then each item as soon as it is whole
//! (masked on its own), then the closing brace, so a long list streams in bounded memory and
//! the agent's client starts reading before the server has finished writing.
//!
//! Anything that does not have that shape (a `Table`, an object, a list with fields after
//! its items) is left to the whole-document path: [`Splitter::feed`] then says so before
//! anything was sent.

use serde_json::Value;

/// The longest head (type and list metadata) or single item accepted.
const MAX_PART: usize = 64 << 20;

/// Writes one item (its JSON text) masked to the output, given the list's item kind (group,
/// kind).
pub type MaskItem<'a> =
    dyn FnMut(&[u8], &(String, String), &mut Vec<u8>) -> Result<(), ListError> + 'a;

/// What the splitter made of the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Bytes to send (masked), possibly none yet.
    Send(Vec<u8>),
    /// Not a list of this shape: nothing was sent; mask the whole document instead (the
    /// bytes so far are returned).
    NotAList(Vec<u8>),
}

/// Why a list could not be masked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListError {
    /// Malformed JSON, or a part too long.
    #[error("the list is not valid JSON agentgate can mask ({0})")]
    Invalid(&'static str),
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Before `"items":[`.
    Head,
    /// Between items (after `[` or a `,`).
    Between,
    /// Inside an item, from its start.
    Item { start: usize },
    /// After the items' `]`.
    Tail,
}

/// Splits one list document into head, items and tail.
pub struct Splitter {
    buf: Vec<u8>,
    /// Scan position in `buf`.
    pos: usize,
    state: State,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// The kind of the list's items (`ConfigMap` for a `ConfigMapList`) and its group.
    pub item_kind: (String, String),
    items: u64,
}

impl Default for Splitter {
    fn default() -> Self {
        Self::new()
    }
}

impl Splitter {
    /// A splitter at the start of a document.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            state: State::Head,
            depth: 0,
            in_string: false,
            escaped: false,
            item_kind: Default::default(),
            items: 0,
        }
    }

    /// Items passed so far.
    pub fn items(&self) -> u64 {
        self.items
    }

    /// Feeds bytes; `mask` writes one item (its JSON text), masked, to the output.
    pub fn feed(&mut self, bytes: &[u8], mask: &mut MaskItem<'_>) -> Result<Step, ListError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        // What was passed (dropped from `buf` once, at the end).
        let mut consumed = 0;
        while self.pos < self.buf.len() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    self.pos += 1;
                    continue;
                }
                // Straight to the string's next quote or backslash.
                match memchr::memchr2(b'"', b'\\', &self.buf[self.pos..]) {
                    Some(i) => {
                        self.pos += i;
                        if self.buf[self.pos] == b'"' {
                            self.in_string = false;
                        } else {
                            self.escaped = true;
                        }
                        self.pos += 1;
                    }
                    None => self.pos = self.buf.len(),
                }
                continue;
            }
            let b = self.buf[self.pos];
            match (&self.state, b) {
                (State::Between | State::Tail, b'"') => {
                    return Err(ListError::Invalid("an item is not an object"));
                }
                (_, b'"') => self.in_string = true,
                (State::Head, b'{' | b'[') => self.depth += 1,
                (State::Head, b'}' | b']') => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        // The document ended without `"items":[` at its top level.
                        return Ok(Step::NotAList(std::mem::take(&mut self.buf)));
                    }
                }
                (State::Between, b) if b.is_ascii_whitespace() || b == b',' => {}
                (State::Between, b'{') => {
                    self.state = State::Item { start: self.pos };
                    self.depth = 1;
                }
                (State::Between, b']') => {
                    out.push(b']');
                    self.state = State::Tail;
                    self.depth = 1;
                }
                (State::Between, _) => return Err(ListError::Invalid("an item is not an object")),
                (State::Item { .. }, b'{' | b'[') => self.depth += 1,
                (State::Item { start }, b'}' | b']') => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        let start = *start;
                        if self.items > 0 {
                            out.push(b',');
                        }
                        mask(&self.buf[start..=self.pos], &self.item_kind, &mut out)?;
                        self.items += 1;
                        self.state = State::Between;
                        self.pos += 1;
                        consumed = self.pos;
                        continue;
                    }
                }
                (State::Tail, b'}') if self.depth == 1 => {
                    self.depth = 0;
                    out.push(b'}');
                }
                (State::Tail, b) if b.is_ascii_whitespace() => {}
                (State::Tail, _) => return Err(ListError::Invalid("fields after the items")),
                _ => {}
            }
            self.pos += 1;
            // The head ends at `"items":[` at depth 1.
            if self.state == State::Head && b == b'[' && self.depth == 2 {
                let head = &self.buf[..self.pos];
                let Some(key_end) = head[..head.len() - 1]
                    .iter()
                    .rposition(|c| !c.is_ascii_whitespace())
                else {
                    continue;
                };
                let before = &head[..=key_end];
                let is_items =
                    before.ends_with(b"\"items\":") || before.ends_with(b"\"items\" :") || {
                        // `"items" : [` with other spacing.
                        let t: Vec<u8> = before
                            .iter()
                            .copied()
                            .filter(|c| !c.is_ascii_whitespace())
                            .collect();
                        t.ends_with(b"\"items\":")
                    };
                if !is_items {
                    continue;
                }
                // The head, closed, must be an object of a `…List` kind.
                let mut closed = head.to_vec();
                closed.extend_from_slice(b"]}");
                let Ok(v) = serde_json::from_slice::<Value>(&closed) else {
                    return Ok(Step::NotAList(std::mem::take(&mut self.buf)));
                };
                let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
                let Some(item) = kind.strip_suffix("List") else {
                    return Ok(Step::NotAList(std::mem::take(&mut self.buf)));
                };
                let group = v
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .and_then(|a| a.rsplit_once('/'))
                    .map_or("", |(g, _)| g);
                self.item_kind = (group.to_owned(), item.to_owned());
                out.extend_from_slice(head);
                consumed = self.pos;
                self.state = State::Between;
                self.depth = 1;
            }
        }
        self.buf.drain(..consumed);
        self.pos -= consumed;
        if let State::Item { start } = &mut self.state {
            *start -= consumed;
        }
        if self.buf.len() > MAX_PART {
            return Err(ListError::Invalid("one part is too long"));
        }
        Ok(Step::Send(out))
    }

    /// Whether the document ended cleanly.
    pub fn finished(&self) -> bool {
        self.state == State::Tail && self.depth == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(doc: &str, chunk: usize) -> Result<(String, u64), String> {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        let mut mask = |raw: &[u8], kind: &(String, String), out: &mut Vec<u8>| {
            let mut v: Value = serde_json::from_slice(raw)
                .map_err(|_| ListError::Invalid("an item does not parse"))?;
            if let Some(d) = v.get_mut("data").and_then(Value::as_object_mut) {
                for x in d.values_mut() {
                    *x = Value::String(format!("masked-{}", kind.1));
                }
            }
            serde_json::to_writer(out, &v).map_err(|_| ListError::Invalid("no output"))
        };
        for c in doc.as_bytes().chunks(chunk) {
            match s.feed(c, &mut mask) {
                Ok(Step::Send(b)) => out.extend(b),
                Ok(Step::NotAList(_)) => return Err("not a list".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
        assert!(s.finished(), "{doc}");
        Ok((String::from_utf8(out).unwrap(), s.items()))
    }

    #[test]
    fn items_stream_masked_whatever_the_chunking() {
        let doc = r#"{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"9"},"items":[{"metadata":{"name":"a}{\"["},"data":{"k":"v]}"}}, {"metadata":{"name":"b"},"data":{"k":"x"}}]}"#;
        for chunk in [1, 2, 7, 1000] {
            let (out, n) = run(doc, chunk).unwrap();
            assert_eq!(n, 2);
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["items"][0]["data"]["k"], "masked-ConfigMap");
            assert_eq!(v["items"][0]["metadata"]["name"], "a}{\"[");
            assert_eq!(v["items"][1]["data"]["k"], "masked-ConfigMap");
            assert_eq!(v["metadata"]["resourceVersion"], "9");
        }
        let (out, n) = run(
            r#"{"kind":"SecretList","apiVersion":"v1","metadata":{},"items":[]}"#,
            3,
        )
        .unwrap();
        assert_eq!(
            (out.as_str(), n),
            (
                r#"{"kind":"SecretList","apiVersion":"v1","metadata":{},"items":[]}"#,
                0
            )
        );
    }

    #[test]
    fn other_shapes_go_to_the_whole_document_path() {
        for doc in [
            r#"{"kind":"Table","apiVersion":"meta.k8s.io/v1","rows":[]}"#,
            r#"{"kind":"ConfigMap","apiVersion":"v1","data":{"items":"[x]"}}"#,
            r#"{"kind":"Widget","apiVersion":"x/v1","spec":{"items":[{"a":1}]}}"#,
            r#"{"items":[{"a":1}],"kind":"Widget","apiVersion":"x/v1"}"#,
        ] {
            assert_eq!(run(doc, 5), Err("not a list".into()), "{doc}");
        }
        assert!(
            run(
                r#"{"kind":"ConfigMapList","apiVersion":"v1","items":[1]}"#,
                4
            )
            .is_err()
        );
        assert!(
            run(
                r#"{"kind":"ConfigMapList","apiVersion":"v1","items":[],"extra":{"a":1}}"#,
                4
            )
            .is_err()
        );
    }
}
