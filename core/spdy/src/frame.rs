//! SPDY/3.1 frames (specification section 2.2 and 2.6).
//!
//! Every frame starts with 8 bytes. A control frame: the control bit, a 15-bit version (3), a
//! 16-bit type, 8 bits of flags and a 24-bit length. A data frame: a clear control bit, a
//! 31-bit stream id, 8 bits of flags and a 24-bit length. The payload follows.

use crate::VERSION;

/// Flag of a data frame, SYN_STREAM, SYN_REPLY and HEADERS: the sender's last frame on the
/// stream.
pub const FLAG_FIN: u8 = 0x01;
/// Flag of a SYN_STREAM: the recipient may not send on the stream.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// Flag of a SETTINGS frame: forget the settings persisted before.
pub const FLAG_SETTINGS_CLEAR: u8 = 0x01;

/// The length field's width: no frame's payload is longer.
pub const MAX_LENGTH: usize = (1 << 24) - 1;
const STREAM_MASK: u32 = 0x7fff_ffff;
const HEADER: usize = 8;

/// The control frame types this crate knows (section 2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ControlKind {
    SynStream = 1,
    SynReply = 2,
    RstStream = 3,
    Settings = 4,
    Ping = 6,
    GoAway = 7,
    Headers = 8,
    WindowUpdate = 9,
}

impl ControlKind {
    fn from_u16(v: u16) -> Option<ControlKind> {
        Some(match v {
            1 => ControlKind::SynStream,
            2 => ControlKind::SynReply,
            3 => ControlKind::RstStream,
            4 => ControlKind::Settings,
            6 => ControlKind::Ping,
            7 => ControlKind::GoAway,
            8 => ControlKind::Headers,
            9 => ControlKind::WindowUpdate,
            _ => return None,
        })
    }

    /// The specification's name of the type, for errors.
    pub fn name(self) -> &'static str {
        match self {
            ControlKind::SynStream => "SYN_STREAM",
            ControlKind::SynReply => "SYN_REPLY",
            ControlKind::RstStream => "RST_STREAM",
            ControlKind::Settings => "SETTINGS",
            ControlKind::Ping => "PING",
            ControlKind::GoAway => "GOAWAY",
            ControlKind::Headers => "HEADERS",
            ControlKind::WindowUpdate => "WINDOW_UPDATE",
        }
    }
}

/// One entry of a SETTINGS frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    /// A 24-bit id (4 is MAX_CONCURRENT_STREAMS, 7 INITIAL_WINDOW_SIZE).
    pub id: u32,
    pub value: u32,
}

/// A frame. Header blocks (`headers`) are as on the wire: compressed, see [`crate::headers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        fin: bool,
        data: Vec<u8>,
    },
    SynStream {
        stream: u32,
        associated: u32,
        /// 0 (highest) to 7.
        priority: u8,
        slot: u8,
        fin: bool,
        unidirectional: bool,
        headers: Vec<u8>,
    },
    SynReply {
        stream: u32,
        fin: bool,
        headers: Vec<u8>,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    Settings {
        clear: bool,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good: u32,
        status: u32,
    },
    Headers {
        stream: u32,
        fin: bool,
        headers: Vec<u8>,
    },
    WindowUpdate {
        /// 0: the session's window (SPDY/3.1).
        stream: u32,
        delta: u32,
    },
}

/// Bounds on what [`parse`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest payload accepted, refused from the frame's first 8 bytes, before any of it
    /// is buffered.
    pub max_frame: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_frame: 1 << 20 }
    }
}

/// A frame that cannot be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("control frame version {0}, not 3")]
    Version(u16),
    #[error("frame length {length} is over the limit of {max} bytes")]
    TooLarge { length: usize, max: usize },
    #[error("{kind} frame of length {length}: {why}")]
    Length {
        kind: &'static str,
        length: usize,
        why: &'static str,
    },
    #[error("{0} frame on stream 0")]
    StreamZero(&'static str),
    #[error("WINDOW_UPDATE of 0 bytes on stream {0}")]
    ZeroDelta(u32),
    #[error("{field} {value} does not fit its field")]
    Field { field: &'static str, value: u64 },
}

/// What [`parse`] found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole frame yet: read more (the frame's size was checked when known).
    Incomplete,
    /// A frame, and the bytes it took.
    Frame(Frame, usize),
    /// A control frame of a type this crate does not know, which the specification says to
    /// ignore: skip this many bytes.
    Ignored(usize),
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

/// Read the frame at the start of `buf`.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Parsed, FrameError> {
    if buf.len() < HEADER {
        return Ok(Parsed::Incomplete);
    }
    let first = be32(buf, 0);
    let flags = buf[4];
    let length = (be32(buf, 4) & 0x00ff_ffff) as usize;
    let control = first & 0x8000_0000 != 0;
    if control {
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
    }
    if length > limits.max_frame {
        return Err(FrameError::TooLarge {
            length,
            max: limits.max_frame,
        });
    }
    let Some(payload) = buf.get(HEADER..HEADER + length) else {
        return Ok(Parsed::Incomplete);
    };
    let used = HEADER + length;
    let fin = flags & FLAG_FIN != 0;
    if !control {
        let stream = first & STREAM_MASK;
        if stream == 0 {
            return Err(FrameError::StreamZero("data"));
        }
        let data = payload.to_vec();
        return Ok(Parsed::Frame(Frame::Data { stream, fin, data }, used));
    }
    let Some(kind) = ControlKind::from_u16((first & 0xffff) as u16) else {
        return Ok(Parsed::Ignored(used));
    };
    let bad = |why| FrameError::Length {
        kind: kind.name(),
        length,
        why,
    };
    let stream_at = |at: usize| -> Result<u32, FrameError> {
        match be32(payload, at) & STREAM_MASK {
            0 => Err(FrameError::StreamZero(kind.name())),
            s => Ok(s),
        }
    };
    let frame = match kind {
        ControlKind::SynStream => {
            if length < 10 {
                return Err(bad("shorter than its 10 fixed bytes"));
            }
            Frame::SynStream {
                stream: stream_at(0)?,
                associated: be32(payload, 4) & STREAM_MASK,
                priority: payload[8] >> 5,
                slot: payload[9],
                fin,
                unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                headers: payload[10..].to_vec(),
            }
        }
        ControlKind::SynReply | ControlKind::Headers => {
            if length < 4 {
                return Err(bad("shorter than its stream id"));
            }
            let (stream, headers) = (stream_at(0)?, payload[4..].to_vec());
            if kind == ControlKind::SynReply {
                Frame::SynReply {
                    stream,
                    fin,
                    headers,
                }
            } else {
                Frame::Headers {
                    stream,
                    fin,
                    headers,
                }
            }
        }
        ControlKind::RstStream => {
            if length != 8 {
                return Err(bad("not 8 bytes"));
            }
            Frame::RstStream {
                stream: stream_at(0)?,
                status: be32(payload, 4),
            }
        }
        ControlKind::Settings => {
            if length < 4 {
                return Err(bad("shorter than its entry count"));
            }
            let count = be32(payload, 0) as usize;
            if count.checked_mul(8).and_then(|n| n.checked_add(4)) != Some(length) {
                return Err(bad("not 4 + 8 bytes per entry it counts"));
            }
            let entries = payload[4..]
                .chunks_exact(8)
                .map(|e| {
                    let id_flags = be32(e, 0);
                    Setting {
                        flags: (id_flags >> 24) as u8,
                        id: id_flags & 0x00ff_ffff,
                        value: be32(e, 4),
                    }
                })
                .collect();
            Frame::Settings {
                clear: flags & FLAG_SETTINGS_CLEAR != 0,
                entries,
            }
        }
        ControlKind::Ping => {
            if length != 4 {
                return Err(bad("not 4 bytes"));
            }
            Frame::Ping {
                id: be32(payload, 0),
            }
        }
        ControlKind::GoAway => {
            if length != 8 {
                return Err(bad("not 8 bytes"));
            }
            Frame::GoAway {
                last_good: be32(payload, 0) & STREAM_MASK,
                status: be32(payload, 4),
            }
        }
        ControlKind::WindowUpdate => {
            if length != 8 {
                return Err(bad("not 8 bytes"));
            }
            let stream = be32(payload, 0) & STREAM_MASK;
            let delta = be32(payload, 4) & STREAM_MASK;
            if delta == 0 {
                return Err(FrameError::ZeroDelta(stream));
            }
            Frame::WindowUpdate { stream, delta }
        }
    };
    Ok(Parsed::Frame(frame, used))
}

fn field(name: &'static str, value: u32, bits: u32) -> Result<u32, FrameError> {
    if u64::from(value) >> bits != 0 {
        return Err(FrameError::Field {
            field: name,
            value: value.into(),
        });
    }
    Ok(value)
}

impl Frame {
    /// The control frame type, or `None` for a data frame.
    pub fn kind(&self) -> Option<ControlKind> {
        Some(match self {
            Frame::Data { .. } => return None,
            Frame::SynStream { .. } => ControlKind::SynStream,
            Frame::SynReply { .. } => ControlKind::SynReply,
            Frame::RstStream { .. } => ControlKind::RstStream,
            Frame::Settings { .. } => ControlKind::Settings,
            Frame::Ping { .. } => ControlKind::Ping,
            Frame::GoAway { .. } => ControlKind::GoAway,
            Frame::Headers { .. } => ControlKind::Headers,
            Frame::WindowUpdate { .. } => ControlKind::WindowUpdate,
        })
    }

    /// Append the frame's wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let fin = |f: bool| if f { FLAG_FIN } else { 0 };
        let mut payload = Vec::new();
        let flags = match self {
            Frame::Data {
                stream,
                fin: f,
                data,
            } => {
                let stream = field("stream id", *stream, 31)?;
                return finish(out, stream, fin(*f), data);
            }
            Frame::SynStream {
                stream,
                associated,
                priority,
                slot,
                fin: f,
                unidirectional,
                headers,
            } => {
                payload.extend(field("stream id", *stream, 31)?.to_be_bytes());
                payload.extend(field("associated stream id", *associated, 31)?.to_be_bytes());
                let priority = field("priority", u32::from(*priority), 3)?;
                payload.push((priority as u8) << 5);
                payload.push(*slot);
                payload.extend(headers);
                fin(*f)
                    | if *unidirectional {
                        FLAG_UNIDIRECTIONAL
                    } else {
                        0
                    }
            }
            Frame::SynReply {
                stream,
                fin: f,
                headers,
            }
            | Frame::Headers {
                stream,
                fin: f,
                headers,
            } => {
                payload.extend(field("stream id", *stream, 31)?.to_be_bytes());
                payload.extend(headers);
                fin(*f)
            }
            Frame::RstStream { stream, status } => {
                payload.extend(field("stream id", *stream, 31)?.to_be_bytes());
                payload.extend(status.to_be_bytes());
                0
            }
            Frame::Settings { clear, entries } => {
                let count = u32::try_from(entries.len()).map_err(|_| FrameError::Field {
                    field: "settings count",
                    value: entries.len() as u64,
                })?;
                payload.extend(count.to_be_bytes());
                for e in entries {
                    let id = field("setting id", e.id, 24)?;
                    payload.extend(((u32::from(e.flags) << 24) | id).to_be_bytes());
                    payload.extend(e.value.to_be_bytes());
                }
                if *clear { FLAG_SETTINGS_CLEAR } else { 0 }
            }
            Frame::Ping { id } => {
                payload.extend(id.to_be_bytes());
                0
            }
            Frame::GoAway { last_good, status } => {
                payload.extend(field("last good stream id", *last_good, 31)?.to_be_bytes());
                payload.extend(status.to_be_bytes());
                0
            }
            Frame::WindowUpdate { stream, delta } => {
                payload.extend(field("stream id", *stream, 31)?.to_be_bytes());
                payload.extend(field("window delta", *delta, 31)?.to_be_bytes());
                0
            }
        };
        let kind = self.kind().map_or(0, |k| k as u32);
        finish(
            out,
            0x8000_0000 | (u32::from(VERSION) << 16) | kind,
            flags,
            &payload,
        )
    }
}

fn finish(out: &mut Vec<u8>, first: u32, flags: u8, payload: &[u8]) -> Result<(), FrameError> {
    if payload.len() > MAX_LENGTH {
        return Err(FrameError::Field {
            field: "length",
            value: payload.len() as u64,
        });
    }
    out.extend(first.to_be_bytes());
    out.push(flags);
    out.extend(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Frame {
        match parse(bytes, &Limits::default()) {
            Ok(Parsed::Frame(f, n)) if n == bytes.len() => f,
            other => panic!("{other:?}"),
        }
    }

    fn wire(f: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        f.encode(&mut out).unwrap_or_else(|e| panic!("{e}"));
        out
    }

    /// Byte layouts written out from the specification's diagrams (section 2.6).
    #[test]
    fn frames_encode_as_the_specification_draws_them() {
        let cases: Vec<(Frame, Vec<u8>)> = vec![
            (
                Frame::Ping { id: 1 },
                vec![0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1],
            ),
            (
                // CANCEL (5) on stream 1.
                Frame::RstStream {
                    stream: 1,
                    status: 5,
                },
                vec![0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 5],
            ),
            (
                Frame::Data {
                    stream: 1,
                    fin: true,
                    data: b"hi".to_vec(),
                },
                vec![0, 0, 0, 1, FLAG_FIN, 0, 0, 2, b'h', b'i'],
            ),
            (
                // INITIAL_WINDOW_SIZE (7) = 65536.
                Frame::Settings {
                    clear: false,
                    entries: vec![Setting {
                        flags: 0,
                        id: 7,
                        value: 65536,
                    }],
                },
                vec![
                    0x80, 3, 0, 4, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 7, 0, 1, 0, 0,
                ],
            ),
            (
                Frame::WindowUpdate {
                    stream: 0,
                    delta: 0x7fff_ffff,
                },
                vec![
                    0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff,
                ],
            ),
            (
                Frame::GoAway {
                    last_good: 7,
                    status: 1,
                },
                vec![0x80, 3, 0, 7, 0, 0, 0, 8, 0, 0, 0, 7, 0, 0, 0, 1],
            ),
            (
                Frame::SynStream {
                    stream: 3,
                    associated: 0,
                    priority: 7,
                    slot: 0,
                    fin: false,
                    unidirectional: true,
                    headers: vec![0xaa],
                },
                vec![
                    0x80,
                    3,
                    0,
                    1,
                    FLAG_UNIDIRECTIONAL,
                    0,
                    0,
                    11,
                    0,
                    0,
                    0,
                    3,
                    0,
                    0,
                    0,
                    0,
                    0xe0,
                    0,
                    0xaa,
                ],
            ),
            (
                Frame::SynReply {
                    stream: 3,
                    fin: true,
                    headers: vec![],
                },
                vec![0x80, 3, 0, 2, FLAG_FIN, 0, 0, 4, 0, 0, 0, 3],
            ),
            (
                Frame::Headers {
                    stream: 5,
                    fin: false,
                    headers: vec![1, 2],
                },
                vec![0x80, 3, 0, 8, 0, 0, 0, 6, 0, 0, 0, 5, 1, 2],
            ),
        ];
        for (frame, bytes) in cases {
            assert_eq!(wire(&frame), bytes, "{frame:?}");
            assert_eq!(one(&bytes), frame);
        }
    }

    #[test]
    fn every_prefix_is_incomplete_and_two_frames_split() {
        let mut both = wire(&Frame::Ping { id: 9 });
        let first = both.len();
        both.extend(wire(&Frame::Data {
            stream: 1,
            fin: false,
            data: vec![7; 100],
        }));
        for cut in 0..first {
            assert_eq!(
                parse(&both[..cut], &Limits::default()),
                Ok(Parsed::Incomplete)
            );
        }
        let Ok(Parsed::Frame(_, n)) = parse(&both, &Limits::default()) else {
            panic!("no first frame");
        };
        assert_eq!(n, first);
        assert!(matches!(
            parse(&both[n..], &Limits::default()),
            Ok(Parsed::Frame(Frame::Data { .. }, 108))
        ));
    }

    #[test]
    fn bad_frames_are_refused_naming_the_fault() {
        let limits = Limits { max_frame: 64 };
        // The size is refused from the 8-byte header alone, before the payload arrives.
        assert_eq!(
            parse(&[0, 0, 0, 1, 0, 0, 1, 0], &limits),
            Err(FrameError::TooLarge {
                length: 256,
                max: 64
            })
        );
        assert_eq!(
            parse(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1], &limits),
            Err(FrameError::Version(2))
        );
        let err = parse(&[0x80, 3, 0, 6, 0, 0, 0, 3, 0, 0, 0], &limits);
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("PING frame of length 3: not 4 bytes".into())
        );
        assert_eq!(
            parse(&[0, 0, 0, 0, 0, 0, 0, 0], &limits),
            Err(FrameError::StreamZero("data"))
        );
        assert_eq!(
            parse(
                &[0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1],
                &limits
            ),
            Err(FrameError::StreamZero("RST_STREAM"))
        );
        assert_eq!(
            parse(
                &[0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0],
                &limits
            ),
            Err(FrameError::ZeroDelta(1))
        );
        // A SETTINGS frame counting more entries than it carries.
        assert!(matches!(
            parse(&[0x80, 3, 0, 4, 0, 0, 0, 4, 0, 0, 0, 1], &limits),
            Err(FrameError::Length {
                kind: "SETTINGS",
                ..
            })
        ));
        assert!(matches!(
            parse(&[0x80, 3, 0, 1, 0, 0, 0, 4, 0, 0, 0, 1], &limits),
            Err(FrameError::Length {
                kind: "SYN_STREAM",
                ..
            })
        ));
        // Unknown control types (5 was NOOP in SPDY/2) are skipped whole.
        assert_eq!(
            parse(&[0x80, 3, 0, 5, 0, 0, 0, 2, 1, 2, 0xff], &limits),
            Ok(Parsed::Ignored(10))
        );
        // Out-of-range fields are refused when encoding.
        let mut out = Vec::new();
        assert!(
            Frame::Ping { id: 1 }.encode(&mut out).is_ok()
                && Frame::RstStream {
                    stream: 1 << 31,
                    status: 0
                }
                .encode(&mut out)
                .is_err()
        );
    }
}
