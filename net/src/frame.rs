//! Length-delimited protobuf framing: a 4-byte big-endian length, then the encoded message.
//!
//! A length above the configured maximum is refused before anything is allocated; a stream that
//! ends inside a frame is `Truncated`; bytes that do not decode are `Decode`. None of these panic.

use bytes::{BufMut, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Framing failures.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced or encoded frame exceeds the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The underlying stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes one frame (length prefix + message) into `buf`.
pub fn encode_frame<M: Message>(msg: &M, max: usize, buf: &mut BytesMut) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    buf.reserve(4 + len);
    // `len <= max` and max is far below u32::MAX in any sane configuration.
    buf.put_u32(u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?);
    msg.encode(buf)
        .map_err(|_| FrameError::TooLarge { len, max })?;
    Ok(())
}

/// Writes frames to an async byte stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: BytesMut,
    max: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a stream; frames larger than `max` are refused.
    pub fn new(inner: W, max: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            max,
        }
    }

    /// Sends one message as a frame.
    pub async fn send<M: Message>(&mut self, msg: &M) -> Result<(), FrameError> {
        self.buf.clear();
        encode_frame(msg, self.max, &mut self.buf)?;
        self.inner.write_all(&self.buf).await?;
        Ok(())
    }

    /// Sends messages as consecutive frames in one write (one wakeup of the connection, so
    /// they usually leave in one packet).
    pub async fn send_all<M: Message>(&mut self, msgs: &[M]) -> Result<(), FrameError> {
        self.buf.clear();
        for msg in msgs {
            encode_frame(msg, self.max, &mut self.buf)?;
        }
        self.inner.write_all(&self.buf).await?;
        Ok(())
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Reads frames from an async byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a stream; frames announcing more than `max` bytes are refused.
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            max,
        }
    }

    /// Reads the next message. `Ok(None)` means the stream ended cleanly between frames.
    pub async fn recv<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        let mut len_buf = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = self.inner.read(&mut len_buf[got..]).await?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            got += n;
        }
        let len = u32::from_be_bytes(len_buf) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        self.buf.resize(len, 0);
        match self.inner.read_exact(&mut self.buf).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(FrameError::Truncated);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Some(M::decode(self.buf.as_slice())?))
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Unwraps the stream. Nothing is read ahead: the next byte is the one after the last
    /// frame, so a stream may start with a frame and go on as raw bytes.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A small message type for tests (prost derive on a hand-written struct).
    #[derive(Clone, PartialEq, prost::Message)]
    struct Msg {
        #[prost(uint64, tag = "1")]
        seq: u64,
        #[prost(string, tag = "2")]
        text: String,
        #[prost(bytes = "vec", tag = "3")]
        blob: Vec<u8>,
    }

    fn encode_all(msgs: &[Msg], max: usize) -> Vec<u8> {
        let mut buf = BytesMut::new();
        for m in msgs {
            encode_frame(m, max, &mut buf).unwrap();
        }
        buf.to_vec()
    }

    async fn decode_all(bytes: &[u8], max: usize) -> Result<Vec<Msg>, FrameError> {
        let mut r = FrameReader::new(bytes, max);
        let mut out = Vec::new();
        while let Some(m) = r.recv::<Msg>().await? {
            out.push(m);
        }
        Ok(out)
    }

    fn random_msg(rng: &mut impl Rng, seq: u64) -> Msg {
        let n = rng.random_range(0..300);
        Msg {
            seq,
            text: (0..rng.random_range(0..40))
                .map(|_| rng.random_range('a'..='z'))
                .collect(),
            blob: (0..n).map(|_| rng.random()).collect(),
        }
    }

    #[tokio::test]
    async fn random_round_trips() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..200 {
            let msgs: Vec<Msg> = (0..rng.random_range(0..20))
                .map(|i| random_msg(&mut rng, i))
                .collect();
            let bytes = encode_all(&msgs, 4096);
            assert_eq!(
                decode_all(&bytes, 4096).await.unwrap(),
                msgs,
                "round {round}"
            );
        }
    }

    #[tokio::test]
    async fn round_trip_through_a_pipe_in_small_pieces() {
        let (a, b) = tokio::io::duplex(7); // tiny buffer: frames arrive in fragments
        let msgs: Vec<Msg> = (0..50)
            .map(|i| Msg {
                seq: i,
                text: "x".repeat(i as usize),
                blob: vec![],
            })
            .collect();
        let expect = msgs.clone();
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(a, 1024);
            for m in &msgs {
                w.send(m).await.unwrap();
            }
        });
        let mut r = FrameReader::new(b, 1024);
        let mut got = Vec::new();
        while let Some(m) = r.recv::<Msg>().await.unwrap() {
            got.push(m);
        }
        writer.await.unwrap();
        assert_eq!(got, expect);
    }

    #[tokio::test]
    async fn max_size_is_enforced_on_both_sides() {
        let big = Msg {
            seq: 1,
            text: String::new(),
            blob: vec![0; 100],
        };
        let len = big.encoded_len();
        // Exactly the max is fine.
        let bytes = encode_all(std::slice::from_ref(&big), len);
        assert_eq!(decode_all(&bytes, len).await.unwrap(), vec![big.clone()]);
        // One byte less is refused by the encoder...
        let mut buf = BytesMut::new();
        assert!(matches!(
            encode_frame(&big, len - 1, &mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        // ...and by the decoder, from the length alone.
        assert!(matches!(
            decode_all(&bytes, len - 1).await,
            Err(FrameError::TooLarge { .. })
        ));
        // A huge announced length never allocates: refused at once.
        let evil = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(
            matches!(decode_all(&evil, 1 << 20).await, Err(FrameError::TooLarge { len, .. }) if len == u32::MAX as usize)
        );
    }

    #[tokio::test]
    async fn truncation_at_every_cut_is_detected() {
        let msgs: Vec<Msg> = (0..3)
            .map(|i| Msg {
                seq: i,
                text: "hello".into(),
                blob: vec![1, 2, 3],
            })
            .collect();
        let bytes = encode_all(&msgs, 1024);
        let boundaries: Vec<usize> = {
            let mut b = vec![0];
            let mut off = 0;
            for m in &msgs {
                off += 4 + m.encoded_len();
                b.push(off);
            }
            b
        };
        for cut in 0..bytes.len() {
            let res = decode_all(&bytes[..cut], 1024).await;
            if boundaries.contains(&cut) {
                let n = boundaries.iter().position(|b| *b == cut).unwrap();
                assert_eq!(res.unwrap().len(), n, "cut {cut}");
            } else {
                assert!(
                    matches!(res, Err(FrameError::Truncated)),
                    "cut {cut}: {res:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn garbage_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut errors = 0;
        for _ in 0..2000 {
            let len = rng.random_range(0..64);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if decode_all(&bytes, 256).await.is_err() {
                errors += 1;
            }
        }
        // Random bytes are overwhelmingly invalid; the point is that nothing panicked.
        assert!(
            errors > 1000,
            "only {errors} of 2000 garbage inputs were refused"
        );
        // A well-formed length with an invalid protobuf payload is a decode error.
        let bad = [0, 0, 0, 2, 0x0a, 0xff];
        assert!(matches!(
            decode_all(&bad, 256).await,
            Err(FrameError::Decode(_)) | Err(FrameError::Truncated)
        ));
        let bad_wire_type = [0, 0, 0, 1, 0x0f];
        assert!(matches!(
            decode_all(&bad_wire_type, 256).await,
            Err(FrameError::Decode(_))
        ));
    }
}
