//! The Switchyard guest agent (being built).

fn main() {}
