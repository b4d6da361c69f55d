//! Decoding never allocates beyond a fixed multiple of the caller's size
//! limit, whatever the input claims. Runs without the test harness so that
//! no other thread allocates while it counts.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::alloc::System;
use std::process::ExitCode;

use bytes::{BufMut, BytesMut};
use relay_proto::{mqtt, tunnel};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Decoded structures may take more room than their wire form (a one-byte
/// topic filter becomes a `String` in a `Vec`); the bound is linear in the
/// limit, never in what a header claims.
const ALLOWED_FACTOR: usize = 10;
const ALLOWED_OVERHEAD: usize = 1024;

/// A small deterministic generator; the inputs are the same on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// Bytes allocated while decoding everything in `input` with `limit`.
fn bytes_allocated_decoding(input: &[u8], limit: usize, tunnel_frames: bool) -> usize {
    let mut buffer = BytesMut::with_capacity(input.len());
    buffer.put_slice(input);
    let region = Region::new(GLOBAL);
    if tunnel_frames {
        while let Ok(Some(message)) = tunnel::decode(&mut buffer, limit) {
            drop(message);
        }
    } else {
        while let Ok(Some(packet)) = mqtt::decode(&mut buffer, limit) {
            drop(packet);
        }
    }
    let stats = region.change();
    stats.bytes_allocated + stats.bytes_reallocated.max(0) as usize
}

fn check(name: &str, input: &[u8], limit: usize, tunnel_frames: bool, failures: &mut Vec<String>) {
    let allocated = bytes_allocated_decoding(input, limit, tunnel_frames);
    let allowed = ALLOWED_FACTOR * limit + ALLOWED_OVERHEAD;
    if allocated > allowed {
        failures.push(format!(
            "{name}: {allocated} bytes allocated with limit {limit} (allowed {allowed})"
        ));
    }
}

/// A SUBSCRIBE of at most `limit` bytes made of one-character filters: the
/// input with the most decoded structure per wire byte.
fn dense_subscribe(limit: usize) -> Vec<u8> {
    let filters = (limit - 6) / 4;
    let packet = mqtt::Packet::Subscribe(mqtt::Subscribe {
        packet_id: mqtt::PacketId::MIN,
        filters: vec![("a".to_owned(), mqtt::QoS::AtLeastOnce); filters],
    });
    let mut bytes = BytesMut::new();
    mqtt::encode(&packet, &mut bytes).expect("encodable");
    bytes.to_vec()
}

fn main() -> ExitCode {
    let mut failures = Vec::new();

    // Headers that claim the maximum: refused before anything is allocated.
    for (name, input, tunnel_frames) in [
        (
            "mqtt 256 MiB claim",
            vec![0x30, 0xff, 0xff, 0xff, 0x7f],
            false,
        ),
        (
            "tunnel 4 GiB claim",
            vec![0x04, 0xff, 0xff, 0xff, 0xff],
            true,
        ),
    ] {
        let allocated = bytes_allocated_decoding(&input, 1024, tunnel_frames);
        if allocated != 0 {
            failures.push(format!(
                "{name}: allocated {allocated} bytes before refusing"
            ));
        }
    }

    for limit in [64, 1024, 65_536] {
        check(
            &format!("dense SUBSCRIBE at {limit}"),
            &dense_subscribe(limit),
            limit,
            false,
            &mut failures,
        );
    }

    let mut random = XorShift(0x5eed_1234_abcd_ef01);
    for round in 0..20_000 {
        let limit = 2 + random.below(4096);
        let len = random.below(8192);
        let mut input: Vec<u8> = (0..len).map(|_| random.next() as u8).collect();
        // Make valid-looking headers common: a packet type with plausible flags
        // and a small remaining length.
        if let Some(first) = input.first_mut() {
            *first = [0x10, 0x30, 0x32, 0x82, 0x90, 0xa2, 0x01, 0x04][round % 8];
        }
        if input.len() > 2 {
            input[1] = (random.below(128)) as u8;
        }
        check(
            &format!("random input {round}"),
            &input,
            limit,
            round % 8 >= 6,
            &mut failures,
        );
    }

    if failures.is_empty() {
        println!("bounded_allocation: 1 passed, 0 failed");
        ExitCode::SUCCESS
    } else {
        for failure in &failures[..failures.len().min(20)] {
            eprintln!("{failure}");
        }
        println!("bounded_allocation: 0 passed, 1 failed");
        ExitCode::FAILURE
    }
}
