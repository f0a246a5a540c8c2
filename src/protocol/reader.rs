//! Cuts a byte stream into [`Frame`]s with one buffer and no copies.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncRead;

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
        self.ready().await?;
        Ok(self
            .try_next()?
            .expect("invariant: ready() saw a whole message"))
    }

    /// The next message if one is already buffered: no read, no wait.
    ///
    /// # Errors
    /// A length below 4 or over the size limit, as [`FrameReader::next`].
    pub fn try_next(&mut self) -> Result<Option<Frame>, Error> {
        Ok(self
            .peek_len()?
            .map(|total| Frame::from_bytes(self.buf.split_to(total).freeze())))
    }

    /// Waits until a whole message is buffered, without taking it (cancel-safe, as `next`).
    ///
    /// # Errors
    /// As [`FrameReader::next`].
    pub fn ready(&mut self) -> impl Future<Output = Result<(), Error>> + '_ {
        // A plain poll function rather than an async one: the relay polls this for every
        // message, and nested futures (this, a fill, tokio's read_buf) cost a state machine
        // each.
        std::future::poll_fn(move |cx| self.poll_ready(cx))
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        while self.peek_len()?.is_none() {
            ready!(self.poll_fill(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Moves the whole messages at the front of the buffer whose type `plain` accepts into
    /// `out`, with one copy and no [`Frame`] each; stops at the first other message, or one
    /// not fully buffered or malformed (left for [`FrameReader::try_next`] to report).
    pub fn forward_while(&mut self, plain: impl Fn(u8) -> bool, out: &mut BytesMut) {
        let mut end = 0;
        while let Some(head) = self.buf.get(end..end + 5) {
            let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
            let Ok(len) = usize::try_from(len) else { break };
            let total = len + 1;
            if !plain(head[0])
                || len < 4
                || total > self.max_message
                || end + total > self.buf.len()
            {
                break;
            }
            end += total;
        }
        if end > 0 {
            out.extend_from_slice(&self.buf[..end]);
            self.buf.advance(end);
        }
    }

    /// The next message if it is whole and its length valid, left in the buffer: its tag and
    /// its bytes. Taken with [`FrameReader::consume`] once dealt with, so a message relayed as
    /// it is needs no frame.
    pub fn peek(&self) -> Option<(u8, &[u8])> {
        match self.peek_len() {
            Ok(Some(total)) => Some((self.buf[0], &self.buf[..total])),
            _ => None,
        }
    }

    /// Drops the first `n` buffered bytes: a message seen with [`FrameReader::peek`].
    pub fn consume(&mut self, n: usize) {
        self.buf.advance(n);
    }

    /// The whole messages at the front of the buffer whose types `part` accepts, up to and
    /// including the first one whose type `last` accepts, taken in one piece (one split for a
    /// client's whole pipeline rather than one per message). None, and nothing taken, when a
    /// message of another type, one not fully buffered or a malformed length comes first.
    pub fn take_run(
        &mut self,
        part: impl Fn(u8) -> bool,
        last: impl Fn(u8) -> bool,
    ) -> Option<Bytes> {
        let mut end = 0;
        while let Some(head) = self.buf.get(end..end + 5) {
            let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
            let Ok(len) = usize::try_from(len) else { break };
            let total = len + 1;
            if len < 4 || total > self.max_message || end + total > self.buf.len() {
                break;
            }
            end += total;
            if last(head[0]) {
                return Some(self.buf.split_to(end).freeze());
            }
            if !part(head[0]) {
                break;
            }
        }
        None
    }

    /// The type of the next message if all of it is already buffered.
    pub fn peek_tag(&self) -> Option<u8> {
        matches!(self.peek_len(), Ok(Some(_))).then(|| self.buf[0])
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
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Reads what the stream has into the buffer (at least one byte, or the end).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.inner),
            cx,
            &mut self.buf
        ))?;
        if n == 0 {
            return Poll::Ready(Err(Error::Closed));
        }
        Poll::Ready(Ok(()))
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
    async fn peeks_whole_messages_only_and_consumes_them() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(b"1\0\0\0\x04Z\0\0\0\x05")
            .await
            .expect("write");
        let mut reader = FrameReader::new(rx, 1024);
        reader.ready().await.expect("a whole message");
        assert_eq!(reader.peek(), Some((b'1', &b"1\0\0\0\x04"[..])));
        reader.consume(5);
        assert_eq!(reader.peek(), None, "ReadyForQuery is not whole yet");
        tx.write_all(b"I2\0\0\0\x02").await.expect("write");
        reader.ready().await.expect("now whole");
        assert_eq!(reader.peek(), Some((b'Z', &b"Z\0\0\0\x05I"[..])));
        reader.consume(6);
        // A bad length is never peeked: try_next reports it.
        assert_eq!(reader.peek(), None);
        assert!(matches!(reader.try_next(), Err(Error::BadLength { .. })));
    }

    #[tokio::test]
    async fn forwards_plain_messages_in_one_copy() {
        let (mut tx, rx) = tokio::io::duplex(256);
        // Two rows, a CommandComplete, then the start of a row still to come.
        tx.write_all(b"D\0\0\0\x06\0\0D\0\0\0\x05\x01C\0\0\0\x05\0D\0\0\0\x08ab")
            .await
            .expect("write");
        let mut reader = FrameReader::new(rx, 1024);
        reader.ready().await.expect("a whole message");
        let mut out = BytesMut::new();
        reader.forward_while(|t| t == b'D', &mut out);
        assert_eq!(&out[..], b"D\0\0\0\x06\0\0D\0\0\0\x05\x01");
        // Stops at a message of another type...
        let c = reader.try_next().expect("valid").expect("buffered");
        assert_eq!(c.tag(), b'C');
        // ...and at one not wholly buffered.
        out.clear();
        reader.forward_while(|t| t == b'D', &mut out);
        assert!(out.is_empty());
        assert!(reader.try_next().expect("valid").is_none());
        tx.write_all(b"cd").await.expect("write");
        reader.ready().await.expect("now whole");
        reader.forward_while(|t| t == b'D', &mut out);
        assert_eq!(&out[..], b"D\0\0\0\x08abcd");
        assert_eq!(reader.buffered(), 0);

        // A malformed length is left for try_next to report.
        tx.write_all(b"D\0\0\0\x02").await.expect("write");
        out.clear();
        assert!(matches!(reader.ready().await, Err(Error::BadLength { .. })));
        reader.forward_while(|t| t == b'D', &mut out);
        assert!(out.is_empty());
        assert!(matches!(reader.try_next(), Err(Error::BadLength { .. })));
    }

    #[tokio::test]
    async fn takes_a_whole_run_up_to_its_last_message_in_one_piece() {
        let part = |t| matches!(t, b'P' | b'B' | b'E');
        let last = |t| t == b'S';
        let (mut tx, rx) = tokio::io::duplex(256);
        let mut reader = FrameReader::new(rx, 1024);
        // Parse, Bind, then an Execute not yet whole: nothing is taken.
        tx.write_all(b"P\0\0\0\x06\0\0B\0\0\0\x05\x01E\0\0\0\x09\0")
            .await
            .expect("write");
        reader.ready().await.expect("a whole message");
        assert_eq!(reader.take_run(part, last), None);
        // Whole up to the Sync, with a Query after it: the run ends at the Sync.
        tx.write_all(b"\0\0\0\0S\0\0\0\x04Q\0\0\0\x05\0")
            .await
            .expect("write");
        while reader.buffered() < 34 {
            reader.fill().await.expect("read");
        }
        let run = reader.take_run(part, last).expect("a whole run");
        let tags: Vec<u8> = crate::protocol::messages(&run).map(|m| m[0]).collect();
        assert_eq!(tags, b"PBES");
        assert_eq!(reader.peek_tag(), Some(b'Q'));
        // A message of another type first: nothing taken, the Query is still next.
        assert_eq!(reader.take_run(part, last), None);
        assert_eq!(
            reader.try_next().expect("valid").expect("whole").tag(),
            b'Q'
        );
        // A bad length inside the run: nothing taken, try_next reports it.
        tx.write_all(b"P\0\0\0\x06\0\0B\0\0\0\x02S\0\0\0\x04")
            .await
            .expect("write");
        while reader.buffered() < 17 {
            reader.fill().await.expect("read");
        }
        assert_eq!(reader.take_run(part, last), None);
        reader.try_next().expect("the Parse is fine");
        assert!(matches!(reader.try_next(), Err(Error::BadLength { .. })));
    }

    #[test]
    fn messages_stop_at_anything_not_whole() {
        let tags = |b: &[u8]| -> Vec<u8> { crate::protocol::messages(b).map(|m| m[0]).collect() };
        assert_eq!(tags(b"S\0\0\0\x04H\0\0\0\x04"), b"SH");
        assert_eq!(
            tags(b"S\0\0\0\x04H\0\0\0\x05"),
            b"S",
            "second one cut short"
        );
        assert_eq!(tags(b"S\0\0\0\x03H\0\0\0\x04"), b"", "a length below 4");
        assert_eq!(tags(b"S\xff\xff\xff\xff"), b"", "a negative length");
        assert_eq!(tags(b"S\0\0"), b"");
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
