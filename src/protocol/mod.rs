//! Wire framing and the few Postgres messages the proxy decodes or synthesizes. No sockets here.
//!
//! A [`Frame`] is one whole message (type byte, length, body) kept as the bytes that arrived, so
//! relaying it is a copy of a reference-counted slice, never a re-encode. Messages the proxy must
//! read (Parse, Bind, ReadyForQuery, ...) are decoded on demand from a frame's body; messages it
//! must invent (auth, errors, ParseComplete, ...) are built by the functions in [`build`].

pub mod build;
pub mod decode;
mod reader;

pub use reader::FrameReader;

use bytes::Bytes;

/// Why a stream of messages could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("message of type {tag:?} is {len} bytes, over the limit of {max}")]
    TooLarge { tag: char, len: usize, max: usize },
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: i32 },
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// One protocol message as it travelled on the wire: `tag`, `i32` length, body.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    bytes: Bytes,
}

impl Frame {
    /// Wraps bytes that hold exactly one message (tag + length + body).
    pub fn from_bytes(bytes: Bytes) -> Frame {
        debug_assert!(bytes.len() >= 5);
        Frame { bytes }
    }

    /// The message type byte.
    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }

    /// The message body, after the length word.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }

    /// The whole message as it goes on the wire.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Frame({:?}, {} bytes)",
            self.tag() as char,
            self.bytes.len()
        )
    }
}

/// The messages of `run`, whole messages back to back (as [`FrameReader::take_run`] takes them),
/// each with its type byte and length word. Stops at anything that is not a whole message.
pub fn messages(run: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = run;
    std::iter::from_fn(move || {
        let head = rest.get(..5)?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        let total = usize::try_from(len).ok().filter(|&l| l >= 4)? + 1;
        let msg = rest.get(..total)?;
        rest = &rest[total..];
        Some(msg)
    })
}

/// Frontend message type bytes the proxy cares about.
pub mod tag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const PASSWORD: u8 = b'p';
    pub const FUNCTION_CALL: u8 = b'F';

    // Backend message type bytes.
    pub const AUTH: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION: u8 = b'A';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const NO_DATA: u8 = b'n';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const EMPTY_QUERY: u8 = b'I';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
}

/// Startup-phase request codes (the first message has no type byte).
pub mod code {
    pub const PROTOCOL_3: i32 = 196_608;
    pub const SSL_REQUEST: i32 = 80_877_103;
    pub const GSSENC_REQUEST: i32 = 80_877_104;
    pub const CANCEL_REQUEST: i32 = 80_877_102;
}

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}
