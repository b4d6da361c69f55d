//! Fuzzes the MQTT 5 decoder; see `oracles.rs` for what is checked.
#![no_main]

#[path = "../oracles.rs"]
mod oracles;

libfuzzer_sys::fuzz_target!(|data: &[u8]| oracles::check_mqtt5_decode(data));
