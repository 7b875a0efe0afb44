//! HPACK (RFC 7541) for [`super::authority`]: a decoder that follows the client's encoder (static and
//! dynamic table, Huffman, size updates) and an encoder that writes only literals "without indexing"
//! or "never indexed", so that the decoder behind it (h2's) never gets a dynamic table entry.

use std::collections::VecDeque;
use std::sync::OnceLock;

#[path = "huffman_table.rs"]
mod huffman_table;

/// Why a header block could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ends inside a representation.
    #[error("header block ends inside a header field")]
    Truncated,
    /// An integer does not fit the limits.
    #[error("HPACK integer too large")]
    IntegerOverflow,
    /// An index names no table entry.
    #[error("header table index {0} does not exist")]
    BadIndex(usize),
    /// A Huffman-coded string is invalid (EOS, bad padding, unknown code).
    #[error("invalid Huffman-coded string")]
    Huffman,
    /// A dynamic table size update above the limit the server advertised.
    #[error("dynamic table size update to {size} exceeds the limit {limit}")]
    SizeUpdate {
        /// The size asked for.
        size: usize,
        /// SETTINGS_HEADER_TABLE_SIZE.
        limit: usize,
    },
    /// A dynamic table size update after the first header field of a block.
    #[error("dynamic table size update after a header field")]
    LateSizeUpdate,
    /// The decoded header list is larger than the caller accepts.
    #[error("decoded header list exceeds {0} bytes")]
    TooLarge(usize),
}

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The name, as sent.
    pub name: Vec<u8>,
    /// The value, as sent.
    pub value: Vec<u8>,
    /// Sent as "never indexed" (a sensitive value): it is re-encoded the same way.
    pub never_indexed: bool,
}

/// The RFC 7541 Appendix A static table (index 1 is `STATIC[0]`).
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// An entry's size in the dynamic table (RFC 7541 §4.1).
fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

/// The decoding side of one connection's HPACK context.
pub struct Decoder {
    /// Newest entry first.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    limit: usize,
}

impl Decoder {
    /// A decoder whose table may grow to `limit` bytes (the SETTINGS_HEADER_TABLE_SIZE advertised).
    pub fn new(limit: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    /// Decodes one complete header block, updating the dynamic table; fails once the header list
    /// (sized as in SETTINGS_MAX_HEADER_LIST_SIZE) exceeds `max_list`.
    pub fn decode(&mut self, block: &[u8], max_list: usize) -> Result<Vec<Field>, HpackError> {
        let mut r = Reader { buf: block, pos: 0 };
        let mut fields = Vec::new();
        let mut list = 0usize;
        let mut push = |fields: &mut Vec<Field>, field: Field| {
            list += entry_size(&field.name, &field.value);
            if list > max_list {
                return Err(HpackError::TooLarge(max_list));
            }
            fields.push(field);
            Ok(())
        };
        while let Some(b) = r.peek() {
            if b & 0x80 != 0 {
                let index = r.int(7)?;
                // An entry is at most `limit` bytes, so the copy is bounded before `push` checks.
                let (name, value) = self.get(index)?;
                let field = Field {
                    name: name.to_vec(),
                    value: value.to_vec(),
                    never_indexed: false,
                };
                push(&mut fields, field)?;
            } else if b & 0x40 != 0 {
                let field = self.literal(&mut r, 6, false)?;
                self.insert(field.name.clone(), field.value.clone());
                push(&mut fields, field)?;
            } else if b & 0x20 != 0 {
                // RFC 7541 §4.2: size updates come first in a block (h2 enforces it too).
                if !fields.is_empty() {
                    return Err(HpackError::LateSizeUpdate);
                }
                let size = r.int(5)?;
                if size > self.limit {
                    return Err(HpackError::SizeUpdate {
                        size,
                        limit: self.limit,
                    });
                }
                self.max_size = size;
                self.evict();
            } else {
                let field = self.literal(&mut r, 4, b & 0x10 != 0)?;
                push(&mut fields, field)?;
            }
        }
        Ok(fields)
    }

    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok((n.as_bytes(), v.as_bytes()))
            }
            _ => self
                .table
                .get(index - 62)
                .map(|(n, v)| (n.as_slice(), v.as_slice()))
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    fn literal(
        &self,
        r: &mut Reader<'_>,
        prefix: u8,
        never_indexed: bool,
    ) -> Result<Field, HpackError> {
        let index = r.int(prefix)?;
        let name = if index == 0 {
            r.string()?
        } else {
            self.get(index)?.0.to_vec()
        };
        let value = r.string()?;
        Ok(Field {
            name,
            value,
            never_indexed,
        })
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = entry_size(&name, &value);
        if size > self.max_size {
            // RFC 7541 §4.4: an entry larger than the table empties it and is not added.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.size += size;
        self.table.push_front((name, value));
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= entry_size(&n, &v),
                None => self.size = 0,
            }
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn byte(&mut self) -> Result<u8, HpackError> {
        let b = self.peek().ok_or(HpackError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    /// An integer with an `n`-bit prefix (RFC 7541 §5.1), at most 2^28 + prefix.
    fn int(&mut self, n: u8) -> Result<usize, HpackError> {
        let mask = (1u8 << n) - 1;
        let mut value = usize::from(self.byte()? & mask);
        if value < usize::from(mask) {
            return Ok(value);
        }
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            if shift > 21 {
                return Err(HpackError::IntegerOverflow);
            }
            value += usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
    }

    /// A string literal (RFC 7541 §5.2).
    fn string(&mut self) -> Result<Vec<u8>, HpackError> {
        let huffman = self.peek().ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = self.int(7)?;
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.buf.len())
            .ok_or(HpackError::Truncated)?;
        let raw = &self.buf[self.pos..end];
        self.pos = end;
        if huffman {
            huffman_decode(raw)
        } else {
            Ok(raw.to_vec())
        }
    }
}

/// A child in the Huffman decoding tree: 0 none, `LEAF | symbol`, or the index of an inner node.
const LEAF: u16 = 0x8000;

fn huffman_tree() -> &'static [[u16; 2]] {
    static TREE: OnceLock<Vec<[u16; 2]>> = OnceLock::new();
    TREE.get_or_init(|| {
        let mut tree = vec![[0u16; 2]];
        for (sym, (&code, &len)) in huffman_table::CODES
            .iter()
            .zip(huffman_table::LENGTHS.iter())
            .enumerate()
        {
            let mut node = 0usize;
            for i in (0..len).rev() {
                let bit = usize::from((code >> i) & 1 == 1);
                if i == 0 {
                    // `sym` < 256, so it fits beside LEAF.
                    tree[node][bit] = LEAF | sym as u16;
                } else {
                    if tree[node][bit] == 0 {
                        tree.push([0; 2]);
                        // At most 256 inner nodes: a prefix code's tree.
                        tree[node][bit] = (tree.len() - 1) as u16;
                    }
                    node = usize::from(tree[node][bit]);
                }
            }
        }
        tree
    })
}

/// Decodes a Huffman-coded string (RFC 7541 §5.2): padding is at most 7 bits, all ones.
pub fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, HpackError> {
    let tree = huffman_tree();
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let (mut node, mut depth, mut ones) = (0usize, 0u32, true);
    for &byte in src {
        for i in (0..8).rev() {
            let bit = (byte >> i) & 1;
            let next = tree[node][usize::from(bit)];
            if next == 0 {
                // Only EOS's path (thirty 1 bits) has no leaf: EOS in a string is an error.
                return Err(HpackError::Huffman);
            }
            if next & LEAF != 0 {
                // The low byte is the symbol (< 256).
                out.push((next & 0xff) as u8);
                (node, depth, ones) = (0, 0, true);
            } else {
                node = usize::from(next);
                depth += 1;
                ones &= bit == 1;
            }
        }
    }
    if depth > 7 || !ones {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

fn put_int(out: &mut Vec<u8>, mut value: usize, n: u8, first: u8) {
    let mask = (1usize << n) - 1;
    if value < mask {
        // value < 2^n <= 128.
        out.push(first | value as u8);
        return;
    }
    out.push(first | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    put_int(out, s.len(), 7, 0);
    out.extend_from_slice(s);
}

/// Encodes `fields` with no dynamic table: each one a literal, its name by static index where one
/// exists, "never indexed" where it came so.
pub fn encode(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        let first = if f.never_indexed { 0x10 } else { 0x00 };
        match STATIC.iter().position(|(n, _)| n.as_bytes() == f.name) {
            Some(i) => put_int(out, i + 1, 4, first),
            None => {
                out.push(first);
                put_string(out, &f.name);
            }
        }
        put_string(out, &f.value);
    }
}

#[cfg(test)]
#[path = "hpack_tests.rs"]
pub(super) mod tests;
