//! Makes the `:authority` that gRPC clients send over a unix socket acceptable to h2.
//!
//! gRPC C-core (Python, C++, Ruby, PHP) sends the percent-encoded socket path
//! (`run%2Fvmmd%2Fvm1.sock`), grpc-java the raw path. h2's server parses `:authority` with
//! `http::uri::Authority` in `server::Peer::convert_poll_message` and answers anything that fails
//! with `RST_STREAM(PROTOCOL_ERROR)`, before hyper or tonic see a request. Neither h2 nor hyper nor
//! tonic has a setting for it (h2 0.4.21, the newest, is unchanged; hyperium/h2#487 to relax it is
//! unmerged), so the fix sits below h2: [`AuthorityFix`] wraps each accepted connection and
//! rewrites the client's header blocks, replacing an `:authority` that `Authority` rejects with
//! `localhost` (what grpc-go sends; a unix socket has no host). Valid authorities pass unchanged.
//!
//! To rewrite one field the whole HPACK context has to be followed: every header block is decoded
//! ([`super::hpack::Decoder`] mirrors the client's dynamic table) and re-encoded with literals
//! only, so h2's own decoder keeps an empty dynamic table and never disagrees with the client.
//! Every other frame passes through byte for byte; the server's bytes are never touched.
//!
//! Whatever the shim does not understand it leaves to h2: from the first frame it cannot
//! transcode (bad preface, a header block it cannot decode or that exceeds the limits below, a
//! frame between HEADERS and CONTINUATION, PUSH_PROMISE, a truncated connection) it forwards the
//! held bytes and everything after unchanged, and h2 answers with its usual GOAWAY or reset.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::uri::Authority;
use tonic::transport::server::Connected;
use tracing::debug;

use super::hpack::{self, Decoder};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// SETTINGS_MAX_FRAME_SIZE: hyper's and h2's default, which vmmd keeps. Larger client frames go
/// to h2 as they are (it rejects them); frames written here never exceed it.
const MAX_FRAME: usize = 16_384;
/// SETTINGS_HEADER_TABLE_SIZE: h2's default, which vmmd keeps.
const TABLE_LIMIT: usize = 4_096;
/// The most header block bytes held (four full frames).
const MAX_BLOCK: usize = 4 * (MAX_FRAME + 9);
/// The largest decoded header list transcoded (four times h2's SETTINGS_MAX_HEADER_LIST_SIZE, so
/// that h2 still answers a list it finds too large with its own error).
const MAX_LIST: usize = 64 * 1024;
/// The authority that replaces one `Authority` rejects.
const LOCALHOST: &[u8] = b"localhost";

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Where the client's byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside the connection preface, this many bytes seen.
    Preface(usize),
    /// Reading a 9-byte frame header.
    FrameHeader,
    /// Forwarding this many payload bytes of a frame that holds no header block.
    Forward(usize),
    /// Holding this many more payload bytes of a HEADERS or CONTINUATION frame.
    Hold(usize),
    /// Forwarding everything unchanged.
    Passthrough,
}

/// A HEADERS frame whose header block is not complete yet.
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
}

/// The client-to-server half of the shim, without I/O: bytes in through [`Inbound::feed`], the
/// bytes h2 gets out through [`Inbound::output`].
pub(super) struct Inbound {
    state: State,
    out: Vec<u8>,
    out_pos: usize,
    header: [u8; 9],
    header_len: usize,
    /// The raw frames of the open header block, for passthrough.
    held: Vec<u8>,
    /// Where the frame being held starts in `held`.
    frame_start: usize,
    /// The open block's fragments.
    block: Vec<u8>,
    open: Option<OpenBlock>,
    decoder: Decoder,
    logged: bool,
}

impl Inbound {
    pub(super) fn new() -> Self {
        Self {
            state: State::Preface(0),
            out: Vec::new(),
            out_pos: 0,
            header: [0; 9],
            header_len: 0,
            held: Vec::new(),
            frame_start: 0,
            block: Vec::new(),
            open: None,
            decoder: Decoder::new(TABLE_LIMIT),
            logged: false,
        }
    }

    /// The bytes ready for h2.
    pub(super) fn output(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// Marks `n` output bytes as taken.
    pub(super) fn consume(&mut self, n: usize) {
        self.out_pos += n;
        if self.out_pos >= self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
    }

    fn passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Takes bytes the client sent.
    pub(super) fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.state {
                State::Passthrough => {
                    self.out.extend_from_slice(input);
                    return;
                }
                State::Preface(seen) => {
                    let n = (PREFACE.len() - seen).min(input.len());
                    if input[..n] != PREFACE[seen..seen + n] {
                        self.give_up("no HTTP/2 client preface");
                        continue;
                    }
                    self.out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if seen + n == PREFACE.len() {
                        State::FrameHeader
                    } else {
                        State::Preface(seen + n)
                    };
                }
                State::FrameHeader => {
                    let n = (9 - self.header_len).min(input.len());
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&input[..n]);
                    self.header_len += n;
                    input = &input[n..];
                    if self.header_len == 9 {
                        self.header_len = 0;
                        self.frame_header();
                    }
                }
                State::Forward(left) => {
                    let n = left.min(input.len());
                    self.out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if n == left {
                        State::FrameHeader
                    } else {
                        State::Forward(left - n)
                    };
                }
                State::Hold(left) => {
                    let n = left.min(input.len());
                    self.held.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if n == left {
                        self.header_frame();
                    } else {
                        self.state = State::Hold(left - n);
                    }
                }
            }
        }
    }

    /// The client closed its side: whatever is held goes to h2 as it is.
    pub(super) fn eof(&mut self) {
        if !self.passthrough() {
            self.held.extend_from_slice(&self.header[..self.header_len]);
            self.header_len = 0;
            self.give_up("connection closed inside a frame");
        }
    }

    /// Forwards what is held and, from now on, everything.
    fn give_up(&mut self, why: &str) {
        debug!(
            why,
            "HTTP/2 :authority shim: h2 gets the rest of the connection unchanged"
        );
        self.out.append(&mut self.held);
        self.block.clear();
        self.open = None;
        self.state = State::Passthrough;
    }

    fn frame_header(&mut self) {
        let h = self.header;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, stream) = (
            h[3],
            u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        );
        let holds = match (kind, &self.open) {
            (HEADERS, None) => true,
            (CONTINUATION, Some(open)) => open.stream == stream,
            (_, None) if kind != PUSH_PROMISE && kind != CONTINUATION => {
                self.out.extend_from_slice(&h);
                self.state = if len == 0 {
                    State::FrameHeader
                } else {
                    State::Forward(len)
                };
                return;
            }
            _ => false,
        };
        self.held.extend_from_slice(&h);
        if !holds {
            self.give_up("a frame h2 must judge inside or instead of a header block");
        } else if len > MAX_FRAME || self.held.len() + len > MAX_BLOCK {
            self.give_up("header block larger than the shim transcodes");
        } else {
            self.frame_start = self.held.len() - 9;
            self.state = State::Hold(len);
            if len == 0 {
                self.header_frame();
            }
        }
    }

    /// A whole HEADERS or CONTINUATION frame is held.
    fn header_frame(&mut self) {
        self.state = State::FrameHeader;
        let frame = &self.held[self.frame_start..];
        let (kind, flags) = (frame[3], frame[4]);
        let payload = &frame[9..];
        if kind == HEADERS {
            let mut p = payload;
            let mut pad = 0;
            if flags & PADDED != 0 {
                let Some((&n, rest)) = p.split_first() else {
                    return self.give_up("HEADERS too short for its padding");
                };
                (pad, p) = (usize::from(n), rest);
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let Some((prio, rest)) = p.split_first_chunk::<5>() else {
                    return self.give_up("HEADERS too short for its priority");
                };
                (priority, p) = (Some(*prio), rest);
            }
            let Some(fragment) = p.len().checked_sub(pad).map(|n| &p[..n]) else {
                return self.give_up("HEADERS padding longer than the frame");
            };
            self.block.extend_from_slice(fragment);
            let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            self.open = Some(OpenBlock {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
            });
        } else {
            self.block.extend_from_slice(payload);
        }
        if flags & END_HEADERS != 0 {
            self.finish_block();
        }
    }

    fn finish_block(&mut self) {
        let mut fields = match self.decoder.decode(&self.block, MAX_LIST) {
            Ok(fields) => fields,
            Err(e) => {
                debug!(error = %e, "HTTP/2 :authority shim: header block not decoded");
                return self.give_up("header block not decoded");
            }
        };
        let Some(open) = self.open.take() else {
            return self.give_up("header block without HEADERS");
        };
        for f in fields.iter_mut().filter(|f| f.name == b":authority") {
            if Authority::try_from(f.value.as_slice()).is_err() {
                if !self.logged {
                    self.logged = true;
                    debug!(
                        authority = %String::from_utf8_lossy(&f.value),
                        "client sent a :authority that is no URI authority (a unix socket path?); \
                         serving it as localhost"
                    );
                }
                f.value = LOCALHOST.to_vec();
            }
        }
        let mut encoded = Vec::new();
        hpack::encode(&fields, &mut encoded);
        self.write_block(&open, &encoded);
        self.held.clear();
        self.block.clear();
    }

    /// Writes `block` as HEADERS plus CONTINUATION frames of at most [`MAX_FRAME`] bytes.
    fn write_block(&mut self, open: &OpenBlock, block: &[u8]) {
        let prio_len = if open.priority.is_some() { 5 } else { 0 };
        let (first, mut rest) = block.split_at(block.len().min(MAX_FRAME - prio_len));
        let mut flags = 0;
        if open.end_stream {
            flags |= END_STREAM;
        }
        if open.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        self.frame(first.len() + prio_len, HEADERS, flags, open.stream);
        if let Some(prio) = open.priority {
            self.out.extend_from_slice(&prio);
        }
        self.out.extend_from_slice(first);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
            let flags = if tail.is_empty() { END_HEADERS } else { 0 };
            self.frame(chunk.len(), CONTINUATION, flags, open.stream);
            self.out.extend_from_slice(chunk);
            rest = tail;
        }
    }

    fn frame(&mut self, len: usize, kind: u8, flags: u8, stream: u32) {
        // len <= MAX_FRAME < 2^24.
        let len = (len as u32).to_be_bytes();
        self.out.extend_from_slice(&len[1..]);
        self.out.extend_from_slice(&[kind, flags]);
        self.out.extend_from_slice(&stream.to_be_bytes());
    }
}

/// An accepted connection whose client bytes go through [`Inbound`]; writes pass straight through.
pub struct AuthorityFix<S> {
    io: S,
    inbound: Inbound,
    buf: Box<[u8]>,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    /// Wraps an accepted connection.
    pub fn new(io: S) -> Self {
        Self {
            io,
            inbound: Inbound::new(),
            buf: vec![0; 8192].into_boxed_slice(),
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let ready = this.inbound.output();
            if !ready.is_empty() {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.inbound.consume(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.inbound.passthrough() {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                this.inbound.eof();
            } else {
                this.inbound.feed(rb.filled());
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
#[path = "authority_tests.rs"]
mod tests;
