//! What ttrpc's errors mean where its error type does not say (the daemon, the shims and the
//! guest agent's host side all ask). ttrpc 0.10 reports some conditions only as
//! `Error::Others(text)`: a request on a client whose connection is gone (0.9 said
//! `LocalClosed`), and a request whose deadline passed. The texts are matched here, once; the
//! unit tests pin them to what ttrpc 0.10 writes.

/// Whether `Error::Others(text)` says the connection is gone: the client's sender is closed
/// because its connection ended (ttrpc 0.10: "reserve channel capacity failed: channel
/// closed").
pub fn closed_message(text: &str) -> bool {
    text.starts_with("reserve channel capacity failed")
}

/// Whether `Error::Others(text)` says the request's deadline passed (ttrpc 0.10: "Request
/// deadline elapsed"; 0.9: "Receive packet timeout ...").
pub fn timeout_message(text: &str) -> bool {
    text == "Request deadline elapsed" || text.contains("timeout")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttrpc_0_10_texts_are_read_as_closed_and_timed_out() {
        assert!(closed_message(
            "reserve channel capacity failed: channel closed"
        ));
        assert!(timeout_message("Request deadline elapsed"));
        assert!(timeout_message("Receive packet timeout Elapsed(())"));
        assert!(!closed_message("Request deadline elapsed"));
        assert!(!timeout_message(
            "reserve channel capacity failed: channel closed"
        ));
        assert!(!closed_message("Receiver got malformed packet"));
    }
}
