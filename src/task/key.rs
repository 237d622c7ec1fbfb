//! `DatastoreKey`: the base64url-encoded `google.datastore.v1.Key` protobuf that Go's
//! `*datastore.Key` marshals to (ctfe-wire.md §4). The poller only needs the ID of the last
//! path element; decoding never panics on garbage (the original crashed on a nil key, B6).

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;

/// The parts of a decoded key the poller and the development CTFE use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatastoreKey {
    /// `partition_id.namespace_id`; empty when absent (as in the Go unit tests).
    pub namespace: String,
    /// Kind of the last path element, e.g. `ChromiumPerfTasks`.
    pub kind: String,
    /// Numeric ID of the last path element (never 0: a named key is rejected).
    pub id: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("DatastoreKey is not base64url")]
    Base64,
    #[error("DatastoreKey protobuf is truncated or malformed at byte {0}")]
    Protobuf(usize),
    #[error("DatastoreKey has no path element")]
    NoPath,
    #[error("DatastoreKey's last path element has no numeric ID")]
    NoId,
}

impl DatastoreKey {
    /// Decodes the JSON string form. Accepts the key with or without `=` padding.
    pub fn decode(encoded: &str) -> Result<Self, Error> {
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .or_else(|_| URL_SAFE.decode(encoded))
            .map_err(|_| Error::Base64)?;
        let mut namespace = String::new();
        let mut last: Option<(String, i64)> = None;
        for field in Fields::new(&bytes) {
            match field? {
                (1, Wire::Len(partition)) => {
                    for f in Fields::new(partition) {
                        if let (4, Wire::Len(ns)) = f? {
                            namespace = String::from_utf8_lossy(ns).into_owned();
                        }
                    }
                }
                (2, Wire::Len(element)) => {
                    let (mut kind, mut id) = (String::new(), 0i64);
                    for f in Fields::new(element) {
                        match f? {
                            (1, Wire::Len(k)) => kind = String::from_utf8_lossy(k).into_owned(),
                            // int64 is a two's-complement varint.
                            (2, Wire::Varint(v)) => id = v as i64,
                            (3, Wire::Len(_)) => id = 0,
                            _ => {}
                        }
                    }
                    last = Some((kind, id));
                }
                _ => {}
            }
        }
        let (kind, id) = last.ok_or(Error::NoPath)?;
        if id == 0 {
            return Err(Error::NoId);
        }
        Ok(Self { namespace, kind, id })
    }

    /// Encodes as Go's `Key.Encode()` does (no padding, fields in number order).
    pub fn encode(&self) -> String {
        let mut element = Vec::new();
        put_len(&mut element, 1, self.kind.as_bytes());
        put_varint_field(&mut element, 2, self.id as u64);
        let mut key = Vec::new();
        if !self.namespace.is_empty() {
            let mut partition = Vec::new();
            put_len(&mut partition, 4, self.namespace.as_bytes());
            put_len(&mut key, 1, &partition);
        }
        put_len(&mut key, 2, &element);
        URL_SAFE_NO_PAD.encode(key)
    }
}

enum Wire<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

/// Iterates `(field number, value)` over one protobuf message, skipping by wire type.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0, failed: false }
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or(Error::Protobuf(self.pos))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Error::Protobuf(self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(Error::Protobuf(self.pos))?;
        let slice = &self.buf[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn next_field(&mut self) -> Result<(u64, Wire<'a>), Error> {
        let tag = self.varint()?;
        let value = match tag & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => self.take(8).map(|_| Wire::Fixed)?,
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| Error::Protobuf(self.pos))?;
                Wire::Len(self.take(len)?)
            }
            5 => self.take(4).map(|_| Wire::Fixed)?,
            _ => return Err(Error::Protobuf(self.pos)),
        };
        Ok((tag >> 3, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Wire<'a>), Error>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let item = self.next_field();
        self.failed = item.is_err();
        Some(item)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

fn put_len(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_the_spec_worked_example() {
        let key = DatastoreKey::decode("ChMiEWNsdXN0ZXItdGVsZW1ldHJ5EhUKEUNocm9taXVtUGVyZlRhc2tzECo").unwrap();
        assert_eq!(
            key,
            DatastoreKey { namespace: "cluster-telemetry".into(), kind: "ChromiumPerfTasks".into(), id: 42 }
        );
        assert_eq!(key.encode(), "ChMiEWNsdXN0ZXItdGVsZW1ldHJ5EhUKEUNocm9taXVtUGVyZlRhc2tzECo");
    }

    #[test]
    fn decodes_a_key_without_namespace() {
        let key = DatastoreKey::decode("EiAKHFJlY3JlYXRlV2VicGFnZUFyY2hpdmVzVGFza3MQKg").unwrap();
        assert_eq!(key.namespace, "");
        assert_eq!(key.kind, "RecreateWebpageArchivesTasks");
        assert_eq!(key.id, 42);
        // Padding is accepted too.
        assert_eq!(DatastoreKey::decode("EiAKHFJlY3JlYXRlV2VicGFnZUFyY2hpdmVzVGFza3MQKg==").unwrap().id, 42);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(DatastoreKey::decode("not base64!"), Err(Error::Base64));
        assert_eq!(DatastoreKey::decode(""), Err(Error::NoPath));
        assert!(matches!(DatastoreKey::decode("EiAKHFJl"), Err(Error::Protobuf(_))));
        // A named key (field 3) has no numeric ID.
        let named = URL_SAFE_NO_PAD.encode([0x12, 0x05, 0x0a, 0x01, b'K', 0x1a, 0x00]);
        assert_eq!(DatastoreKey::decode(&named), Err(Error::NoId));
        // Group wire types are not valid here.
        assert!(matches!(DatastoreKey::decode(&URL_SAFE_NO_PAD.encode([0x0b])), Err(Error::Protobuf(_))));
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(ns in "[a-z-]{0,20}", kind in "[A-Za-z]{1,30}", id in 1i64..i64::MAX) {
            let key = DatastoreKey { namespace: ns, kind, id };
            prop_assert_eq!(DatastoreKey::decode(&key.encode()).unwrap(), key);
        }

        #[test]
        fn arbitrary_input_never_panics(s in ".{0,80}") {
            let _ = DatastoreKey::decode(&s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = DatastoreKey::decode(&URL_SAFE_NO_PAD.encode(bytes));
        }
    }
}
