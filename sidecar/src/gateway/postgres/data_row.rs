//! DataRow masking: each value read through its column's format and type, masked by the
//! column's rule or the value detectors, and written back in a form the client can parse
//! (NULL stays NULL; a type that cannot carry masking text becomes NULL).

use bytes::Bytes;

use super::frame::Frame;
use crate::mask::{MaskSet, Masked};

/// Where a row's result formats come from.
#[derive(Clone, Copy, Debug)]
pub enum Formats<'a> {
    /// A RowDescription's, one per column.
    Described(&'a [i16]),
}

impl Formats<'_> {
    /// Whether `column` is in binary format.
    pub fn binary(self, column: usize) -> bool {
        match self {
            Formats::Described(codes) => codes.get(column).copied().unwrap_or(0) == 1,
        }
    }
}

/// PostgreSQL type OIDs whose binary form is their text (UTF-8): text, varchar, bpchar, name,
/// json, unknown, citext-like domains are reported as their base type.
const TEXT_TYPES: [u32; 6] = [25, 1043, 1042, 19, 114, 705];
/// jsonb: a version byte, then the text.
const JSONB: u32 = 3802;

/// The text of a binary value, when its type has one agentgate can read; `None` otherwise.
fn binary_text(type_oid: u32, bytes: &[u8]) -> Option<String> {
    match type_oid {
        t if TEXT_TYPES.contains(&t) => std::str::from_utf8(bytes).ok().map(str::to_owned),
        JSONB => match bytes.split_first() {
            Some((1, rest)) => std::str::from_utf8(rest).ok().map(str::to_owned),
            _ => None,
        },
        // int2, int4, int8, oid: a card number or an ID can hide in an integer.
        21 => <[u8; 2]>::try_from(bytes)
            .ok()
            .map(|b| i16::from_be_bytes(b).to_string()),
        23 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| i32::from_be_bytes(b).to_string()),
        26 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| u32::from_be_bytes(b).to_string()),
        20 => <[u8; 8]>::try_from(bytes)
            .ok()
            .map(|b| i64::from_be_bytes(b).to_string()),
        700 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| f32::from_be_bytes(b).to_string()),
        701 => <[u8; 8]>::try_from(bytes)
            .ok()
            .map(|b| f64::from_be_bytes(b).to_string()),
        16 => match bytes {
            [0] => Some("f".into()),
            [1] => Some("t".into()),
            _ => None,
        },
        _ => None,
    }
}

/// Types whose values cannot carry masking text (a client would fail to parse it): a masked
/// value of one of them goes as NULL, in text and in binary.
const NOT_TEXT: [u32; 17] = [
    16, 17, 20, 21, 23, 26, 700, 701, 1700, 1082, 1083, 1114, 1184, 1186, 1266, 2950, 790,
];

/// A masked text-format value: the masking text, or NULL for types that cannot carry it.
fn text_masked(type_oid: u32, text: String) -> Option<Bytes> {
    (!NOT_TEXT.contains(&type_oid)).then(|| Bytes::from(text))
}

/// A masked binary value: text types carry the masking text; other types cannot, so they go
/// as NULL.
fn binary_masked(type_oid: u32, text: String) -> Option<Bytes> {
    if TEXT_TYPES.contains(&type_oid) {
        Some(Bytes::from(text))
    } else if type_oid == JSONB {
        let mut b = Vec::with_capacity(text.len() + 1);
        b.push(1);
        b.extend_from_slice(text.as_bytes());
        Some(Bytes::from(b))
    } else {
        None
    }
}

/// Masks the values of a DataRow (`types`: each column's type OID; `rules`: the rule of each
/// masked column), counting masked values by rule into `counts`; `None` if the row is
/// malformed.
///
/// Binary values are read through their type: text-like types and integers are masked like
/// text; a binary value of any other type cannot be searched for patterns, so when value
/// detectors apply it goes as NULL (fail closed), and a masked column of such a type is NULL.
pub fn mask(
    masks: &MaskSet,
    frame: &Frame,
    formats: Formats<'_>,
    types: &[u32],
    rules: &[Option<crate::mask::Rule>],
    counts: &mut std::collections::BTreeMap<String, u64>,
) -> Option<Frame> {
    let mut values = super::backend::decode_data_row(frame).ok()?;
    let mut changed = false;
    for (i, v) in values.iter_mut().enumerate() {
        let Some(bytes) = v.as_ref() else { continue };
        let binary = formats.binary(i);
        let type_oid = types.get(i).copied().unwrap_or(0);
        let text = if binary {
            binary_text(type_oid, bytes)
        } else {
            Some(String::from_utf8_lossy(bytes).into_owned())
        };
        let masked = match (rules.get(i), text) {
            // A masked column: the whole value, whatever it looks like.
            (Some(Some(rule)), Some(t)) => match count(counts, rule).apply_whole(&t) {
                Masked::Clear => Masked::Null,
                // A JSON value stays JSON: the masking text becomes a JSON string.
                Masked::Text(m) if matches!(type_oid, 114 | JSONB) => {
                    Masked::Text(serde_json::Value::String(m).to_string())
                }
                m => m,
            },
            (Some(Some(rule)), None) => {
                *counts.entry(rule.name.clone()).or_default() += 1;
                Masked::Null
            }
            (_, Some(t)) => {
                let (m, applied) = masks.mask(None, &t);
                for rule in applied {
                    *counts.entry(rule).or_default() += 1;
                }
                m
            }
            (_, None) if masks.has_value_rules() => Masked::Null,
            (_, None) => Masked::Clear,
        };
        match masked {
            Masked::Clear => {}
            Masked::Null => {
                *v = None;
                changed = true;
            }
            Masked::Text(t) => {
                *v = if binary {
                    binary_masked(type_oid, t)
                } else {
                    text_masked(type_oid, t)
                };
                changed = true;
            }
        }
    }
    Some(if changed {
        super::backend::encode_data_row(&values)
    } else {
        frame.clone()
    })
}

/// Counts one value masked by `rule`.
fn count<'a>(
    counts: &mut std::collections::BTreeMap<String, u64>,
    rule: &'a crate::mask::Rule,
) -> &'a crate::mask::Rule {
    *counts.entry(rule.name.clone()).or_default() += 1;
    rule
}
