//! Message framing: one flag byte, then the payload, zstd-compressed when it is larger than
//! the compression threshold and compression pays. Decompression is bounded by the channel's
//! size cap, read from the zstd frame header before any allocation, so a small frame cannot
//! expand into a large buffer (no zip bombs).

use std::sync::atomic::{AtomicU64, Ordering};

/// Flag: the payload follows as is.
pub const FLAG_RAW: u8 = 0;
/// Flag: the payload follows zstd-compressed (with its content size in the zstd header).
pub const FLAG_ZSTD: u8 = 1;
/// zstd level: level 1 compresses blocks of transactions ~2-3x at hundreds of MB/s per core;
/// higher levels cost CPU on the consensus path for little gain (docs/networking.md).
pub const ZSTD_LEVEL: i32 = 1;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// No flag byte.
    #[error("empty frame")]
    Empty,
    /// A flag this version does not know.
    #[error("unknown frame flag {0}")]
    UnknownFlag(u8),
    /// The payload (or what it would decompress to) is over the cap.
    #[error("payload of {len} bytes exceeds the {max}-byte cap")]
    TooLarge {
        /// Claimed or actual size.
        len: u64,
        /// The cap.
        max: usize,
    },
    /// Compressed data that does not decompress.
    #[error("bad compressed payload: {0}")]
    Corrupt(String),
}

/// Bytes sent and received, by direction and by whether the frame was compressed: wire bytes
/// (frame sizes), exported as `keel_p2p_bytes_total{direction, compressed}`.
#[derive(Debug, Default)]
pub struct ByteStats {
    sent_raw: AtomicU64,
    sent_compressed: AtomicU64,
    received_raw: AtomicU64,
    received_compressed: AtomicU64,
    /// Payload bytes before compression of the frames sent compressed.
    sent_compressed_payload: AtomicU64,
}

/// A snapshot of [`ByteStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteCounts {
    /// Wire bytes of uncompressed frames sent.
    pub sent_raw: u64,
    /// Wire bytes of compressed frames sent.
    pub sent_compressed: u64,
    /// Wire bytes of uncompressed frames received.
    pub received_raw: u64,
    /// Wire bytes of compressed frames received.
    pub received_compressed: u64,
    /// What the compressed frames sent held before compression.
    pub sent_compressed_payload: u64,
}

impl ByteStats {
    /// The counts so far.
    pub fn counts(&self) -> ByteCounts {
        ByteCounts {
            sent_raw: self.sent_raw.load(Ordering::Relaxed),
            sent_compressed: self.sent_compressed.load(Ordering::Relaxed),
            received_raw: self.received_raw.load(Ordering::Relaxed),
            received_compressed: self.received_compressed.load(Ordering::Relaxed),
            sent_compressed_payload: self.sent_compressed_payload.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn record_sent(&self, frame: &[u8], payload_len: usize) {
        self.add_sent(frame.len(), is_compressed(frame), payload_len);
    }

    /// Counts a sent frame of `len` bytes holding `payload_len` bytes of payload.
    pub(crate) fn add_sent(&self, len: usize, compressed: bool, payload_len: usize) {
        let len = len as u64;
        if compressed {
            self.sent_compressed.fetch_add(len, Ordering::Relaxed);
            self.sent_compressed_payload
                .fetch_add(payload_len as u64, Ordering::Relaxed);
        } else {
            self.sent_raw.fetch_add(len, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_received(&self, frame: &[u8]) {
        let len = frame.len() as u64;
        if frame.first() == Some(&FLAG_ZSTD) {
            self.received_compressed.fetch_add(len, Ordering::Relaxed);
        } else {
            self.received_raw.fetch_add(len, Ordering::Relaxed);
        }
    }
}

/// Whether a frame carries a compressed payload.
pub fn is_compressed(frame: &[u8]) -> bool {
    frame.first() == Some(&FLAG_ZSTD)
}

/// Frames `payload`: compressed if it is larger than `threshold` bytes and compression makes
/// it smaller, raw otherwise.
pub fn encode(payload: &[u8], threshold: usize) -> Vec<u8> {
    if payload.len() > threshold {
        if let Ok(compressed) = zstd::bulk::compress(payload, ZSTD_LEVEL) {
            if compressed.len() < payload.len() {
                let mut out = Vec::with_capacity(compressed.len() + 1);
                out.push(FLAG_ZSTD);
                out.extend_from_slice(&compressed);
                return out;
            }
        }
    }
    let mut out = Vec::with_capacity(payload.len() + 1);
    out.push(FLAG_RAW);
    out.extend_from_slice(payload);
    out
}

/// Unframes, refusing payloads over `max` bytes, before decompressing them.
pub fn decode(frame: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    let (flag, body) = frame.split_first().ok_or(FrameError::Empty)?;
    match *flag {
        FLAG_RAW => {
            if body.len() > max {
                return Err(FrameError::TooLarge {
                    len: body.len() as u64,
                    max,
                });
            }
            Ok(body.to_vec())
        }
        FLAG_ZSTD => {
            // The content size is in the frame header (our encoder always writes it); a frame
            // without one, or claiming more than the cap, is refused before allocating.
            let size = match zstd::zstd_safe::get_frame_content_size(body) {
                Ok(Some(size)) => size,
                Ok(None) => return Err(FrameError::Corrupt("no content size".into())),
                Err(_) => return Err(FrameError::Corrupt("not a zstd frame".into())),
            };
            if size > max as u64 {
                return Err(FrameError::TooLarge { len: size, max });
            }
            let out = zstd::bulk::decompress(body, size as usize)
                .map_err(|e| FrameError::Corrupt(e.to_string()))?;
            if out.len() as u64 != size {
                return Err(FrameError::Corrupt("content size mismatch".into()));
            }
            Ok(out)
        }
        other => Err(FrameError::UnknownFlag(other)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn block_like(n: usize) -> Vec<u8> {
        // Repetitive but not constant, like encoded transactions with shared fields.
        (0..n).map(|i| (i % 17) as u8 ^ ((i / 500) as u8)).collect()
    }

    #[test]
    fn small_payloads_stay_raw_and_large_ones_are_compressed() {
        let small = block_like(1024);
        let frame = encode(&small, 1024);
        assert_eq!(frame[0], FLAG_RAW);
        assert_eq!(decode(&frame, 1 << 20).unwrap(), small);

        let large = block_like(1025);
        let frame = encode(&large, 1024);
        assert_eq!(frame[0], FLAG_ZSTD);
        assert!(frame.len() < large.len());
        assert_eq!(decode(&frame, 1 << 20).unwrap(), large);
    }

    #[test]
    fn incompressible_payloads_are_sent_raw() {
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let frame = encode(&noise, 1024);
        assert_eq!(decode(&frame, 1 << 20).unwrap(), noise);
    }

    #[test]
    fn bombs_and_garbage_are_refused_without_expanding() {
        // 64 MiB of zeros compresses to a few KiB: refused by its header, not by inflating it.
        let zeros = vec![0u8; 64 << 20];
        let bomb = encode(&zeros, 0);
        assert!(bomb.len() < 64 * 1024, "bomb is {} bytes", bomb.len());
        assert_eq!(
            decode(&bomb, 16 << 20),
            Err(FrameError::TooLarge {
                len: 64 << 20,
                max: 16 << 20
            })
        );
        assert_eq!(decode(&[], 10), Err(FrameError::Empty));
        assert_eq!(decode(&[9, 1, 2], 10), Err(FrameError::UnknownFlag(9)));
        assert!(matches!(
            decode(&[FLAG_ZSTD, 1, 2, 3, 4, 5], 10),
            Err(FrameError::Corrupt(_))
        ));
        assert!(matches!(
            decode(&[FLAG_RAW; 12], 10),
            Err(FrameError::TooLarge { .. })
        ));
        // A truncated compressed frame.
        let ok = encode(&block_like(5000), 1024);
        assert!(decode(&ok[..ok.len() / 2], 1 << 20).is_err());
    }

    #[test]
    fn stats_count_wire_bytes_by_compression() {
        let stats = ByteStats::default();
        let small = encode(&block_like(100), 1024);
        let large = encode(&block_like(10_000), 1024);
        stats.record_sent(&small, 100);
        stats.record_sent(&large, 10_000);
        stats.record_received(&large);
        let c = stats.counts();
        assert_eq!(c.sent_raw, small.len() as u64);
        assert_eq!(c.sent_compressed, large.len() as u64);
        assert_eq!(c.sent_compressed_payload, 10_000);
        assert_eq!(c.received_compressed, large.len() as u64);
        assert_eq!(c.received_raw, 0);
    }
}
