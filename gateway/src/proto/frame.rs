//! Length-prefixed framing: a 4-byte big-endian length N (1..=max) followed by N bytes.
//! [`FrameDecoder`] cuts frames out of a byte buffer that the caller fills; [`encode`] adds
//! the prefix. No I/O.

use bytes::{Buf, Bytes, BytesMut};

/// Why the framing of a stream is lost. The stream is closed with the matching code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A length prefix of 0.
    #[error("frame length 0")]
    Empty,
    /// A length prefix above the limit.
    #[error("frame length {len} exceeds max_frame_bytes {max}")]
    TooLarge { len: u32, max: u32 },
}

impl FrameError {
    /// The stream close code for this error.
    pub fn close_code(self) -> super::CloseCode {
        match self {
            FrameError::Empty => super::CloseCode::BadFraming,
            FrameError::TooLarge { .. } => super::CloseCode::TooLarge,
        }
    }
}

/// Cuts complete frames out of a growing buffer.
#[derive(Debug)]
pub struct FrameDecoder {
    max: u32,
    buf: BytesMut,
}

impl FrameDecoder {
    /// A decoder that accepts frames of 1..=`max` bytes. It holds no buffer until bytes
    /// arrive: an idle device's stream (its `hello` answered) keeps only what its bytes needed,
    /// not a 4 KiB reserve (`scripts/footprint.sh` measures the memory per idle device).
    pub fn new(max: u32) -> Self {
        FrameDecoder {
            max,
            buf: BytesMut::new(),
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame body, `Ok(None)` when more bytes are needed.
    /// The length is checked as soon as the 4-byte prefix is in, before the body arrives.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        let total = 4 + len as usize;
        if self.buf.len() < total {
            // Nothing is reserved for the declared length: memory grows with the bytes that
            // arrive (which QUIC flow control bounds), not with what a peer claims it will send.
            return Ok(None);
        }
        self.buf.advance(4);
        Ok(Some(self.buf.split_to(len as usize).freeze()))
    }

    /// Bytes received but not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Appends one frame (prefix and body) to `out`.
pub fn encode(body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finding: the decoder reserved the declared length (up to `max_frame_bytes`) as
    /// soon as the prefix was in: four bytes per stream held the whole maximum.
    #[test]
    fn a_declared_length_reserves_nothing_before_the_bytes_arrive() {
        let mut d = FrameDecoder::new(16 << 20);
        d.extend(&(16u32 << 20).to_be_bytes());
        assert_eq!(d.next_frame(), Ok(None));
        assert!(d.buf.capacity() < 64 * 1024, "{}", d.buf.capacity());
    }

    #[test]
    fn splits_frames_across_arbitrary_chunks() {
        let mut wire = Vec::new();
        encode(b"abc", &mut wire);
        encode(b"d", &mut wire);
        let mut d = FrameDecoder::new(16);
        let mut got = Vec::new();
        for b in wire {
            d.extend(&[b]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            vec![Bytes::from_static(b"abc"), Bytes::from_static(b"d")]
        );
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn zero_length_is_bad_framing() {
        let mut d = FrameDecoder::new(16);
        d.extend(&[0, 0, 0, 0, 1]);
        assert_eq!(d.next_frame(), Err(FrameError::Empty));
        assert_eq!(
            FrameError::Empty.close_code(),
            super::super::CloseCode::BadFraming
        );
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let mut d = FrameDecoder::new(16);
        d.extend(&17u32.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        );
        let mut d = FrameDecoder::new(16);
        d.extend(&u32::MAX.to_be_bytes());
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn max_length_is_accepted() {
        let mut wire = Vec::new();
        encode(&[7u8; 16], &mut wire);
        let mut d = FrameDecoder::new(16);
        d.extend(&wire);
        assert_eq!(d.next_frame().unwrap().unwrap().len(), 16);
    }
}
