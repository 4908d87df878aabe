//! SPDY/3.1 frames as a streaming client sends them: frames parsed one after another from the
//! bytes, and the header blocks of SYN_STREAM, SYN_REPLY and HEADERS frames decompressed through
//! one session context, as the streaming server reads them.
#![no_main]

use switchyard_spdy::{Decompressor, Frame, Limits, Parsed, parse};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_frame: 64 << 10 };
    let mut headers = Decompressor::new(64 << 10, 128);
    let mut rest = data;
    while let Ok(parsed) = parse(rest, &limits) {
        let used = match parsed {
            Parsed::Incomplete => break,
            Parsed::Ignored(n) => n,
            Parsed::Frame(frame, n) => {
                if let Frame::SynStream { headers: h, .. }
                | Frame::SynReply { headers: h, .. }
                | Frame::Headers { headers: h, .. } = &frame
                    && headers.decompress(h).is_err()
                {
                    break;
                }
                let mut out = Vec::new();
                // What parses encodes again, to the same bytes.
                if frame.encode(&mut out).is_ok() && frame.kind().is_some() {
                    assert_eq!(parse(&out, &limits), Ok(Parsed::Frame(frame, out.len())));
                }
                n
            }
        };
        rest = &rest[used..];
    }
});
