//! What the vm shim decodes from the guest agent: a ttrpc frame header, the ttrpc Response, and
//! the reply message inside it (the first byte picks which type).
#![no_main]

use yard_agent_protocol::protobuf::Message;
use yard_agent_protocol::agent;
use yard_agent_protocol::ttrpc;

fn decode<M: Message>(payload: &[u8]) {
    if let Ok(m) = M::parse_from_bytes(payload) {
        // What parses must encode again.
        let _ = m.write_to_bytes();
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    // The client reads exactly the 10-byte header, then the frame it announces.
    if let Some(header) = rest.get(..10) {
        let _ = ttrpc::MessageHeader::from(header);
    }
    let payload = match ttrpc::Response::parse_from_bytes(rest) {
        Ok(response) => response.payload,
        Err(_) => rest.to_vec(),
    };
    match which % 9 {
        0 => decode::<agent::HelloResponse>(&payload),
        1 => decode::<agent::StartProcessResponse>(&payload),
        2 => decode::<agent::WaitResponse>(&payload),
        3 => decode::<agent::ReadResponse>(&payload),
        4 => decode::<agent::WriteResponse>(&payload),
        5 => decode::<agent::PidsResponse>(&payload),
        6 => decode::<agent::StatsResponse>(&payload),
        7 => decode::<agent::OomEvent>(&payload),
        _ => decode::<agent::Empty>(&payload),
    }
});
