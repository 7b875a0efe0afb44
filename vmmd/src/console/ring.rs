//! The bounded ring of guest output not yet delivered: the oldest bytes go when it is full.

use std::collections::VecDeque;

/// Most bytes copied out of the ring per write to the backend.
pub(super) const OUT_CHUNK: usize = 64 * 1024;

/// Guest output not yet delivered.
pub(super) struct OutBuf {
    pub(super) data: VecDeque<u8>,
    pub(super) capacity: usize,
    /// Stream offset of `data[0]` (bytes delivered or dropped before it).
    pub(super) head_seq: u64,
    pub(super) dropped: u64,
    /// The thread sleeps with nothing to send and wants the eventfd signalled on new output.
    pub(super) waiting: bool,
}

impl OutBuf {
    /// Appends `buf`, dropping the oldest bytes beyond the capacity.
    pub(super) fn push(&mut self, buf: &[u8]) {
        let keep = if buf.len() > self.capacity {
            let skip = buf.len() - self.capacity;
            self.dropped += skip as u64;
            &buf[skip..]
        } else {
            buf
        };
        let overflow = (self.data.len() + keep.len()).saturating_sub(self.capacity);
        if overflow > 0 {
            self.data.drain(..overflow);
            self.head_seq += overflow as u64;
            self.dropped += overflow as u64;
        }
        // Bytes skipped from `buf` itself never entered the ring but are part of the stream.
        self.head_seq += (buf.len() - keep.len()) as u64;
        self.data.extend(keep);
    }

    /// Takes everything not yet delivered (it counts as handed on).
    pub(super) fn take_all(&mut self) -> Vec<u8> {
        self.head_seq += self.data.len() as u64;
        self.data.drain(..).collect()
    }

    /// Copies the oldest bytes into `scratch`; returns the stream offset of the copy.
    pub(super) fn peek(&self, scratch: &mut Vec<u8>) -> u64 {
        scratch.clear();
        let (a, b) = self.data.as_slices();
        let from_a = a.len().min(OUT_CHUNK);
        scratch.extend_from_slice(&a[..from_a]);
        let from_b = b.len().min(OUT_CHUNK - from_a);
        scratch.extend_from_slice(&b[..from_b]);
        self.head_seq
    }

    /// Marks `n` bytes copied at stream offset `seq` as delivered.
    pub(super) fn consume(&mut self, seq: u64, n: usize) {
        let end = seq + n as u64;
        // Bytes the writer dropped while they were being written out were delivered after all.
        let delivered_anyway = self.head_seq.min(end).saturating_sub(seq);
        self.dropped = self.dropped.saturating_sub(delivered_anyway);
        if end > self.head_seq {
            let n = usize::try_from(end - self.head_seq)
                .unwrap_or(usize::MAX)
                .min(self.data.len());
            self.data.drain(..n);
            self.head_seq += n as u64;
        }
    }
}

impl OutBuf {
    /// An empty ring holding at most `capacity` bytes.
    pub(super) fn new(capacity: usize) -> OutBuf {
        OutBuf {
            data: VecDeque::with_capacity(capacity.min(OUT_CHUNK)),
            capacity,
            head_seq: 0,
            dropped: 0,
            waiting: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_delivered_while_dropped_count_as_delivered() {
        let mut out = OutBuf::new(4);
        out.push(b"abcd");
        let mut scratch = Vec::new();
        let seq = out.peek(&mut scratch);
        assert_eq!(scratch, b"abcd");
        out.push(b"ef");
        assert_eq!(out.dropped, 2);
        out.consume(seq, 4);
        assert_eq!(out.dropped, 0, "the dropped bytes went out in the copy");
        assert_eq!(out.data, b"ef");
        assert_eq!(out.take_all(), b"ef");
        assert_eq!(out.head_seq, 6);
    }
}
