//! A client's first bytes of a session, made by another implementation: C zlib (through
//! Python's `zlib.compressobj(zdict=...)`) compressed the two header blocks with the SPDY/3
//! dictionary, one stream flushed with `Z_SYNC_FLUSH` after each block, as a Kubernetes client
//! opens the error and stdout streams of an exec. The same bytes seed the `spdy_frames` fuzz
//! target (fuzz/corpus/spdy_frames/syn-streams).

use switchyard_spdy::{Decompressor, Frame, Limits, Parsed, parse};

#[rustfmt::skip]
const SESSION: &[u8] = &[
    0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x33, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x78, 0xbb, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0xe5, 0x0e, 0x70, 0x3a, 0x2b,
    0x29, 0x4a, 0x4d, 0xcc, 0x85, 0x16, 0x25, 0xac, 0xa9, 0xa0, 0x80, 0x06, 0x32, 0x38, 0x8b,
    0x20, 0xd1, 0x96, 0x09, 0x4a, 0xce, 0x8c, 0x06, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x80,
    0x03, 0x00, 0x01, 0x02, 0x00, 0x00, 0x1c, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0xc2, 0xaa, 0x18, 0x98, 0xbc, 0x53, 0xf2, 0xc1, 0xa5, 0x36, 0x9a, 0x6a, 0x00,
    0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x03, 0x01, 0x00, 0x00, 0x05, 0x68, 0x65,
    0x6c, 0x6c, 0x6f
];

#[test]
fn a_session_compressed_by_c_zlib_reads_back() {
    let limits = Limits::default();
    let mut headers = Decompressor::new(64 << 10, 128);
    let mut rest = SESSION;
    let mut seen = Vec::new();
    while !rest.is_empty() {
        let Ok(Parsed::Frame(frame, n)) = parse(rest, &limits) else {
            panic!("no frame at {}", SESSION.len() - rest.len());
        };
        rest = &rest[n..];
        match frame {
            Frame::SynStream {
                stream,
                unidirectional,
                headers: h,
                ..
            } => {
                let block = headers.decompress(&h).unwrap_or_else(|e| panic!("{e}"));
                seen.push(format!(
                    "syn {stream} {} {} {unidirectional}",
                    block.get("streamtype").unwrap_or_default(),
                    block.get("requestid").unwrap_or_default()
                ));
            }
            Frame::Data { stream, fin, data } => seen.push(format!(
                "data {stream} {fin} {}",
                String::from_utf8_lossy(&data)
            )),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "syn 1 error 0 false",
            "syn 3 stdout 0 true",
            "data 3 true hello"
        ]
    );
    // The zlib header names the SPDY/3 dictionary by its Adler-32 checksum.
    assert_eq!(&SESSION[18..24], &[0x78, 0xbb, 0xe3, 0xc6, 0xa7, 0xc2]);
}
