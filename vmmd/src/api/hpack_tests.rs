//! HPACK against RFC 7541 Appendix C and malformed input.

use super::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex"))
        .collect()
}

fn pairs(fields: &[Field]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|f| {
            (
                String::from_utf8_lossy(&f.name).into_owned(),
                String::from_utf8_lossy(&f.value).into_owned(),
            )
        })
        .collect()
}

fn want(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// The Huffman encoding of `s` (the test's independent encoder), padded with 1 bits.
pub(crate) fn huffman_encode(s: &[u8]) -> Vec<u8> {
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u64, 0u32);
    for &b in s {
        let len = u32::from(huffman_table::LENGTHS[usize::from(b)]);
        acc = (acc << len) | u64::from(huffman_table::CODES[usize::from(b)]);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
    out
}

const REQ1: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
];
const REQ2: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
    ("cache-control", "no-cache"),
];
const REQ3: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "https"),
    (":path", "/index.html"),
    (":authority", "www.example.com"),
    ("custom-key", "custom-value"),
];

#[test]
fn rfc_c3_requests_without_huffman() {
    let mut d = Decoder::new(4096);
    let b1 = hex("828684410f7777772e6578616d706c652e636f6d");
    assert_eq!(pairs(&d.decode(&b1, 1 << 16).unwrap()), want(REQ1));
    assert_eq!(d.size, 57);
    let b2 = hex("828684be58086e6f2d6361636865");
    assert_eq!(pairs(&d.decode(&b2, 1 << 16).unwrap()), want(REQ2));
    assert_eq!(d.size, 110);
    let b3 = hex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565");
    assert_eq!(pairs(&d.decode(&b3, 1 << 16).unwrap()), want(REQ3));
    assert_eq!(d.size, 164);
    assert_eq!(d.table.len(), 3);
}

#[test]
fn rfc_c4_requests_with_huffman() {
    let mut d = Decoder::new(4096);
    let b1 = hex("828684418cf1e3c2e5f23a6ba0ab90f4ff");
    assert_eq!(pairs(&d.decode(&b1, 1 << 16).unwrap()), want(REQ1));
    let b2 = hex("828684be5886a8eb10649cbf");
    assert_eq!(pairs(&d.decode(&b2, 1 << 16).unwrap()), want(REQ2));
    let b3 = hex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf");
    assert_eq!(pairs(&d.decode(&b3, 1 << 16).unwrap()), want(REQ3));
    assert_eq!(d.size, 164);
}

#[test]
fn rfc_c5_eviction_in_a_256_byte_table() {
    let mut d = Decoder::new(256);
    let b1 = hex(
        "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d54\
         6e1768747470733a2f2f7777772e6578616d706c652e636f6d",
    );
    let first = d.decode(&b1, 1 << 16).unwrap();
    assert_eq!(first[0].value, b"302");
    assert_eq!(d.size, 222);
    let b2 = hex("4803333037c1c0bf");
    let second = d.decode(&b2, 1 << 16).unwrap();
    assert_eq!(second[0].value, b"307");
    assert_eq!(second[1..], first[1..]);
    assert_eq!(d.size, 222);
    assert_eq!(d.table.len(), 4);
}

#[test]
fn huffman_round_trips_every_byte() {
    let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    assert_eq!(huffman_decode(&huffman_encode(&all)).unwrap(), all);
    assert_eq!(huffman_decode(&[]).unwrap(), b"");
    for s in [
        &b"a"[..],
        b"localhost",
        b"run%2Fvmmd%2Fvm1.sock",
        b"/run/vmmd/vm1.sock",
    ] {
        assert_eq!(huffman_decode(&huffman_encode(s)).unwrap(), s);
    }
}

#[test]
fn huffman_rejects_eos_and_bad_padding() {
    // EOS (thirty 1 bits) padded to 32 bits.
    assert_eq!(huffman_decode(&[0xff; 4]), Err(HpackError::Huffman));
    // 'a' (00011) then eight 1 bits of padding and more.
    assert_eq!(huffman_decode(&[0x1f, 0xff]), Err(HpackError::Huffman));
    // 'a' padded with 0 bits.
    assert_eq!(huffman_decode(&[0x18]), Err(HpackError::Huffman));
}

#[test]
fn malformed_blocks_are_errors() {
    let cases: &[(&[u8], HpackError)] = &[
        (&[0x80], HpackError::BadIndex(0)),
        (&[0xbe], HpackError::BadIndex(62)),
        (&[0xff, 0x80], HpackError::Truncated),
        (
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            HpackError::IntegerOverflow,
        ),
        (&[0x41, 0x05, b'a'], HpackError::Truncated),
        (&[0x00, 0x01], HpackError::Truncated),
        (
            &[0x3f, 0xe2, 0x1f],
            HpackError::SizeUpdate {
                size: 4097,
                limit: 4096,
            },
        ),
        (&[0x82, 0x20], HpackError::LateSizeUpdate),
        (&[0x41, 0x81, 0x00, 0x00], HpackError::Huffman),
    ];
    for (block, err) in cases {
        assert_eq!(
            Decoder::new(4096).decode(block, 1 << 16).as_ref(),
            Err(err),
            "{block:02x?}"
        );
    }
    // 4 x (":method" GET = 42 bytes) > 100.
    assert_eq!(
        Decoder::new(4096).decode(&[0x82; 4], 100),
        Err(HpackError::TooLarge(100))
    );
}

#[test]
fn a_size_update_evicts_and_an_oversized_entry_empties_the_table() {
    let mut d = Decoder::new(4096);
    d.decode(&hex("400161016140016201624001630163"), 1 << 16)
        .unwrap();
    assert_eq!(d.table.len(), 3);
    // Size update to 68: room for two 34-byte entries.
    d.decode(&[0x3f, 0x25], 1 << 16).unwrap();
    assert_eq!((d.table.len(), d.size), (2, 68));
    assert_eq!(d.decode(&[0xc0], 1 << 16), Err(HpackError::BadIndex(64)));
    assert_eq!(
        pairs(&d.decode(&[0xbe], 1 << 16).unwrap()),
        want(&[("c", "c")])
    );
    // A 69-byte entry does not fit: the table empties.
    let mut long = vec![0x40, 0x05];
    long.extend_from_slice(b"aaaaa");
    long.push(32);
    long.extend_from_slice(&[b'b'; 32]);
    d.decode(&long, 1 << 16).unwrap();
    assert_eq!((d.table.len(), d.size), (0, 0));
}

#[test]
fn encode_round_trips_through_a_fresh_decoder_without_indexing() {
    let fields = vec![
        Field {
            name: b":authority".to_vec(),
            value: b"localhost".to_vec(),
            never_indexed: false,
        },
        Field {
            name: b"x-custom".to_vec(),
            value: vec![b'v'; 300],
            never_indexed: false,
        },
        Field {
            name: b"authorization".to_vec(),
            value: b"secret".to_vec(),
            never_indexed: true,
        },
    ];
    let mut out = Vec::new();
    encode(&fields, &mut out);
    let mut d = Decoder::new(4096);
    assert_eq!(d.decode(&out, 1 << 16).unwrap(), fields);
    assert!(d.table.is_empty());
    // ":authority" by static name index 1, no indexing.
    assert_eq!(out[0], 0x01);
}

#[test]
fn random_blocks_never_panic() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut d = Decoder::new(4096);
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 40) as usize;
        let block: Vec<u8> = (0..len)
            .map(|i| (x >> ((i % 8) * 8)) as u8 ^ i as u8)
            .collect();
        let _ = d.decode(&block, 1 << 16);
        assert!(d.size <= 4096);
    }
}
