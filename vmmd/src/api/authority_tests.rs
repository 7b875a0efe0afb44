//! The :authority shim on hand-built client byte streams.

use super::*;
use crate::api::hpack::Field;

const SETTINGS: &[u8] = &[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 0x3, 0, 0, 0, 100];

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A literal with incremental indexing, name by static index, Huffman-coded value.
fn indexed_huffman(name_index: u8, value: &[u8]) -> Vec<u8> {
    let v = crate::api::hpack::tests::huffman_encode(value);
    assert!(v.len() < 127);
    let mut out = vec![0x40 | name_index, 0x80 | v.len() as u8];
    out.extend_from_slice(&v);
    out
}

/// POST /vmmd.v1.Vmm/Info with `authority` (indexed into the dynamic table) and a te literal.
fn request_block(authority: &[u8]) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    b.extend(indexed_huffman(1, authority));
    b.extend([0x04, 17]); // :path by static name, no indexing
    b.extend_from_slice(b"/vmmd.v1.Vmm/Info");
    b.extend([0x00, 2, b't', b'e', 8]);
    b.extend_from_slice(b"trailers");
    b
}

fn client(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut c = PREFACE.to_vec();
    c.extend_from_slice(SETTINGS);
    for f in frames {
        c.extend_from_slice(f);
    }
    c
}

/// Feeds `input` in `chunk`-byte pieces, then EOF.
fn run(input: &[u8], chunk: usize) -> Vec<u8> {
    let mut rx = Inbound::new();
    for piece in input.chunks(chunk) {
        rx.feed(piece);
    }
    rx.eof();
    rx.output().to_vec()
}

/// The frames after the preface: (type, flags, stream, payload).
fn frames(out: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    assert_eq!(&out[..24], PREFACE);
    let mut rest = &out[24..];
    let mut v = Vec::new();
    while !rest.is_empty() {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
        v.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    v
}

/// Decodes the header blocks h2 would see, with a decoder of its own that must stay empty.
fn blocks(out: &[u8]) -> Vec<Vec<(String, String)>> {
    let mut d = Decoder::new(TABLE_LIMIT);
    let mut all = Vec::new();
    let mut block = Vec::new();
    for (kind, flags, _, payload) in frames(out) {
        match kind {
            HEADERS => {
                let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                assert_eq!(flags & PADDED, 0);
                block.extend_from_slice(&payload[skip..]);
            }
            CONTINUATION => block.extend_from_slice(&payload),
            _ => continue,
        }
        assert!(payload.len() <= MAX_FRAME);
        if flags & END_HEADERS != 0 {
            let fields: Vec<Field> = d.decode(&block, 1 << 20).unwrap();
            assert_eq!(
                d.decode(&[0xbe], 1 << 20),
                Err(hpack::HpackError::BadIndex(62))
            );
            all.push(
                fields
                    .into_iter()
                    .map(|f| {
                        (
                            String::from_utf8(f.name).unwrap(),
                            String::from_utf8(f.value).unwrap(),
                        )
                    })
                    .collect(),
            );
            block.clear();
        }
    }
    all
}

fn authority_of(block: &[(String, String)]) -> &str {
    &block.iter().find(|(n, _)| n == ":authority").unwrap().1
}

#[test]
fn a_socket_path_authority_becomes_localhost_and_valid_ones_stay() {
    for (sent, seen) in [
        (&b"run%2Fvmmd%2Fvm1.sock"[..], "localhost"),
        (b"/run/vmmd/vm1.sock", "localhost"),
        (b"%2Frun%2Fvmmd%2Fvm1.sock", "localhost"),
        (b"localhost", "localhost"),
        (b"[::]:50051", "[::]:50051"),
        (b"vmm.example:443", "vmm.example:443"),
    ] {
        let input = client(&[frame(HEADERS, END_HEADERS, 1, &request_block(sent))]);
        for chunk in [1, 7, input.len()] {
            let out = run(&input, chunk);
            let b = blocks(&out);
            assert_eq!(b.len(), 1);
            assert_eq!(authority_of(&b[0]), seen, "{sent:?}");
            assert_eq!(b[0][3].0, ":path");
            assert_eq!(b[0][3].1, "/vmmd.v1.Vmm/Info");
            assert_eq!(b[0][4], ("te".into(), "trailers".into()));
            assert_eq!(&out[24..24 + SETTINGS.len()], SETTINGS);
        }
    }
}

#[test]
fn later_requests_reference_the_dynamic_table() {
    let first = request_block(b"run%2Fvmmd%2Fvm1.sock");
    // The second request names :authority by dynamic index 62 (the entry the first one added).
    let second = [0x83, 0x86, 0xbe, 0x84];
    let data = frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]);
    let input = client(&[
        frame(HEADERS, END_HEADERS, 1, &first),
        data.clone(),
        frame(HEADERS, END_HEADERS | END_STREAM, 3, &second),
    ]);
    let out = run(&input, 3);
    let b = blocks(&out);
    assert_eq!(b.len(), 2);
    assert_eq!(authority_of(&b[1]), "localhost");
    let f = frames(&out);
    assert_eq!(f[2], (0x0, END_STREAM, 1, data[9..].to_vec()));
    assert_eq!((f[3].1, f[3].2), (END_HEADERS | END_STREAM, 3));
}

#[test]
fn padding_priority_and_continuation_are_handled() {
    let block = request_block(b"/run/vmmd/vm1.sock");
    let (a, b) = block.split_at(5);
    let mut headers = vec![3u8];
    headers.extend_from_slice(&[0x80, 0, 0, 0, 16]);
    headers.extend_from_slice(a);
    headers.extend_from_slice(&[0; 3]);
    let input = client(&[
        frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &headers),
        frame(CONTINUATION, 0, 5, &b[..2]),
        frame(CONTINUATION, END_HEADERS, 5, &b[2..]),
    ]);
    let out = run(&input, 1);
    let f = frames(&out);
    assert_eq!(f.len(), 2);
    assert_eq!(f[1].1, PRIORITY | END_STREAM | END_HEADERS);
    assert_eq!(f[1].3[..5], [0x80, 0, 0, 0, 16]);
    assert_eq!(authority_of(&blocks(&out)[0]), "localhost");
}

#[test]
fn a_large_block_is_split_into_frames_h2_accepts() {
    let mut block = request_block(b"run%2Fvmmd%2Fvm1.sock");
    let value = vec![b'x'; 30_000];
    block.extend([0x00, 5]);
    block.extend_from_slice(b"x-big");
    // Length 30000: the 7-bit prefix full, then 30000 - 127 in 7-bit groups.
    block.push(0x7f);
    let mut n = 30_000 - 127;
    while n >= 0x80 {
        block.push(0x80 | (n & 0x7f) as u8);
        n >>= 7;
    }
    block.push(n as u8);
    block.extend_from_slice(&value);
    let (a, b) = block.split_at(16_000);
    let input = client(&[
        frame(HEADERS, 0, 1, a),
        frame(CONTINUATION, END_HEADERS, 1, b),
    ]);
    let out = run(&input, 4096);
    let f = frames(&out);
    assert_eq!(f.len(), 3);
    assert_eq!(
        (f[1].0, f[1].1, f[2].0, f[2].1),
        (HEADERS, 0, CONTINUATION, END_HEADERS)
    );
    let b = blocks(&out);
    assert_eq!(authority_of(&b[0]), "localhost");
    assert_eq!(b[0][5].1.len(), 30_000);
}

#[test]
fn what_the_shim_cannot_transcode_reaches_h2_unchanged() {
    let good = frame(HEADERS, END_HEADERS, 1, &request_block(b"localhost"));
    let cases = [
        // Not HTTP/2 at all.
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        // An HPACK index that does not exist.
        client(&[frame(HEADERS, END_HEADERS, 1, &[0x82, 0xc0])]),
        // Bad Huffman (EOS).
        client(&[frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0x41, 0x84, 0xff, 0xff, 0xff, 0xff],
        )]),
        // A PING between HEADERS and its CONTINUATION.
        client(&[
            frame(HEADERS, 0, 1, &[0x82]),
            frame(0x6, 0, 0, &[0; 8]),
            frame(CONTINUATION, END_HEADERS, 1, &[0x84]),
        ]),
        // CONTINUATION of another stream, a lone CONTINUATION, PUSH_PROMISE.
        client(&[
            frame(HEADERS, 0, 1, &[0x82]),
            frame(CONTINUATION, END_HEADERS, 3, &[0x84]),
        ]),
        client(&[frame(CONTINUATION, END_HEADERS, 1, &[0x84])]),
        client(&[frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82])]),
        // Padding longer than the frame.
        client(&[frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82])]),
        // A frame larger than SETTINGS_MAX_FRAME_SIZE.
        client(&[frame(HEADERS, END_HEADERS, 1, &vec![0x82; MAX_FRAME + 1])]),
        // A header block longer than the shim holds.
        {
            let mut v = vec![frame(HEADERS, 0, 1, &vec![0x82; MAX_FRAME])];
            v.extend((0..4).map(|_| frame(CONTINUATION, 0, 1, &vec![0x82; MAX_FRAME])));
            client(&v)
        },
        // The connection ends inside a frame header and inside a header block.
        client(&[good[..5].to_vec()]),
        client(&[good[..20].to_vec()]),
    ];
    for input in cases {
        let mut tail = input.clone();
        tail.extend_from_slice(&good);
        for chunk in [1, 5, tail.len()] {
            let want = if input.ends_with(&good[..5]) || input.ends_with(&good[..20]) {
                &input
            } else {
                &tail
            };
            assert_eq!(
                &run(want, chunk),
                want,
                "{:02x?}",
                &want[..want.len().min(64)]
            );
        }
    }
}

#[tokio::test]
async fn the_io_wrapper_rewrites_reads_and_passes_writes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_end, server_end) = tokio::io::duplex(64);
    let mut shim = AuthorityFix::new(server_end);
    let input = client(&[frame(
        HEADERS,
        END_HEADERS,
        1,
        &request_block(b"run%2Fx.sock"),
    )]);
    let writer = tokio::spawn(async move {
        client_end.write_all(&input).await.unwrap();
        client_end.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_end.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut seen = Vec::new();
    shim.read_to_end(&mut seen).await.unwrap();
    assert_eq!(authority_of(&blocks(&seen)[0]), "localhost");
    shim.write_all(SETTINGS).await.unwrap();
    shim.shutdown().await.unwrap();
    drop(shim);
    assert_eq!(writer.await.unwrap(), SETTINGS);
}

#[test]
fn random_client_bytes_never_panic_and_keep_frames_whole() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..2_000 {
        let mut frames_in = Vec::new();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let kind = [HEADERS, CONTINUATION, 0x0, 0x4, PUSH_PROMISE][(x % 5) as usize];
            let payload: Vec<u8> = (0..(x >> 8) % 24).map(|i| (x >> (i % 56)) as u8).collect();
            frames_in.push(frame(kind, (x >> 16) as u8, (x >> 24) as u32 % 4, &payload));
        }
        let input = client(&frames_in);
        let out = run(&input, 1 + round % 13);
        assert!(out.len() >= PREFACE.len() + SETTINGS.len());
    }
}
