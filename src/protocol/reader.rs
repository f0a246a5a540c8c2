//! Cuts a byte stream into [`Frame`]s with one buffer and no copies.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{Error, Frame};

const READ_CHUNK: usize = 16 * 1024;

/// Reads whole messages from `inner`. Every future it returns is cancel-safe: bytes already read
/// stay in the buffer, so it can sit in a `select!` loop.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_message: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max_message: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_message,
        }
    }

    /// True if a whole message is already buffered (so the caller can batch its writes until
    /// the next read would have to wait).
    pub fn has_frame(&self) -> bool {
        matches!(self.peek_len(), Ok(Some(_)))
    }

    /// The next message, or [`Error::Closed`] at end of stream.
    ///
    /// # Errors
    /// I/O errors, a length below 4 or over the size limit (the stream is then unusable).
    pub async fn next(&mut self) -> Result<Frame, Error> {
        loop {
            if let Some(total) = self.peek_len()? {
                return Ok(Frame::from_bytes(self.buf.split_to(total).freeze()));
            }
            self.fill().await?;
        }
    }

    /// The startup-phase message (length-prefixed, no type byte): returns its body after the
    /// length word.
    ///
    /// # Errors
    /// As [`FrameReader::next`]; startup messages are capped at 10 000 bytes as Postgres does.
    pub async fn next_startup(&mut self) -> Result<bytes::Bytes, Error> {
        const MAX_STARTUP: usize = 10_000;
        loop {
            if self.buf.len() >= 4 {
                let len = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                if !(8..=MAX_STARTUP as i32).contains(&len) {
                    return Err(Error::BadLength { tag: '\0', len });
                }
                let len = len as usize;
                if self.buf.len() >= len {
                    let mut frame = self.buf.split_to(len);
                    frame.advance(4);
                    return Ok(frame.freeze());
                }
            }
            self.fill().await?;
        }
    }

    /// Bytes buffered but not yet returned (used when handing a stream over).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    fn peek_len(&self) -> Result<Option<usize>, Error> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 {
            return Err(Error::BadLength {
                tag: tag as char,
                len,
            });
        }
        let total = len as usize + 1;
        if total > self.max_message {
            return Err(Error::TooLarge {
                tag: tag as char,
                len: total,
                max: self.max_message,
            });
        }
        Ok((self.buf.len() >= total).then_some(total))
    }

    async fn fill(&mut self) -> Result<(), Error> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        let n = self.inner.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(Error::Closed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn splits_messages_across_reads() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(rx, 1024);
        tokio::spawn(async move {
            tx.write_all(b"Q\0\0\0\x0bSELECT").await.expect("write");
            tx.write_all(b"\0Z\0\0\0\x05I").await.expect("write");
        });
        let q = reader.next().await.expect("query");
        assert_eq!(q.tag(), b'Q');
        assert_eq!(q.body(), b"SELECT\0");
        let z = reader.next().await.expect("rfq");
        assert_eq!(z.body(), b"I");
        assert!(matches!(reader.next().await, Err(Error::Closed)));
    }

    #[tokio::test]
    async fn rejects_oversized_and_negative_lengths() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(b"Q\x7f\xff\xff\xff").await.expect("write");
        let mut reader = FrameReader::new(rx, 1024);
        assert!(matches!(reader.next().await, Err(Error::TooLarge { .. })));

        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(b"Q\0\0\0\x02").await.expect("write");
        let mut reader = FrameReader::new(rx, 1024);
        assert!(matches!(reader.next().await, Err(Error::BadLength { .. })));
    }

    #[tokio::test]
    async fn startup_length_is_bounded() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(&[0x7f, 0xff, 0xff, 0xff])
            .await
            .expect("write");
        let mut reader = FrameReader::new(rx, 1024);
        assert!(matches!(
            reader.next_startup().await,
            Err(Error::BadLength { .. })
        ));
    }
}
