//! Fuzzes the hub with the property test's operations (attach, detach,
//! subscribe, unsubscribe, publish, broker answers and publishes, upstream
//! loss and resume, time), two bytes each; every step checks the hub's
//! invariants (`relay_hub::invariants`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_hub::invariants::run_ops(data));
