//! Benchmarks of the hot paths: PUBLISH decode and encode at a Bambu delta
//! (110 B) and a full report (4.4 KB), and subscription-index lookups among
//! 10,000 filters (with a linear scan beside it for scale).
//!
//! Run with `cargo bench -p relay-proto`. A small harness of its own keeps
//! the build lean: each case runs in timed batches, and the median batch is
//! reported per operation.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use relay_proto::mqtt::{self, Packet, Publish, QoS};
use relay_proto::subscription_index::SubscriptionIndex;
use relay_proto::topic::topic_matches;

const BATCHES: usize = 31;
const BATCH_TIME: Duration = Duration::from_millis(40);

/// Runs `operation` in batches sized to about `BATCH_TIME` and returns the
/// median time per operation.
fn measure(mut operation: impl FnMut()) -> Duration {
    let mut per_batch = 1u32;
    loop {
        let start = Instant::now();
        for _ in 0..per_batch {
            operation();
        }
        if start.elapsed() >= BATCH_TIME / 4 {
            break;
        }
        per_batch *= 2;
    }
    let mut samples: Vec<Duration> = (0..BATCHES)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_batch {
                operation();
            }
            start.elapsed() / per_batch
        })
        .collect();
    samples.sort();
    samples[BATCHES / 2]
}

fn report(name: &str, per_op: Duration, bytes: Option<usize>) {
    let nanos = per_op.as_secs_f64() * 1e9;
    match bytes {
        Some(bytes) => println!(
            "{name:<44} {nanos:>10.1} ns/op {:>10.0} MB/s",
            bytes as f64 / per_op.as_secs_f64() / 1e6
        ),
        None => println!("{name:<44} {nanos:>10.1} ns/op"),
    }
}

fn publish(payload_len: usize) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "device/01P00A123456789/report".into(),
        packet_id: None,
        payload: Bytes::from(vec![b'x'; payload_len]),
    })
}

fn bench_publish(payload_len: usize, label: &str) {
    let packet = publish(payload_len);
    let mut wire = BytesMut::new();
    mqtt::encode(&packet, &mut wire).expect("encodable");
    let wire = wire.freeze();
    let size = wire.len();

    let mut out = BytesMut::with_capacity(size);
    report(
        &format!("publish encode {label}"),
        measure(|| {
            out.clear();
            mqtt::encode(black_box(&packet), &mut out).expect("encodable");
            black_box(&out);
        }),
        Some(size),
    );

    let mut buffer = BytesMut::with_capacity(size);
    report(
        &format!("publish decode {label}"),
        measure(|| {
            buffer.extend_from_slice(&wire);
            let packet = mqtt::decode(black_box(&mut buffer), 1 << 20).expect("valid");
            black_box(packet);
        }),
        Some(size),
    );
}

fn bench_index() {
    let serials: Vec<String> = (0..5_000).map(|i| format!("01P{i:011}")).collect();
    let mut filters = Vec::new();
    for (i, serial) in serials.iter().enumerate() {
        filters.push(format!("device/{serial}/report"));
        filters.push(if i % 2 == 0 {
            format!("device/{serial}/#")
        } else {
            format!("device/{serial}/request")
        });
    }
    filters.truncate(9_998);
    filters.push("device/+/report".into());
    filters.push("#".into());
    let mut index = SubscriptionIndex::new();
    for (id, filter) in filters.iter().enumerate() {
        index.insert(filter, id as u32);
    }
    let topic = format!("device/{}/report", serials[1234]);
    let matches = index.matches(&topic).len();
    report(
        &format!("index lookup, 10k filters ({matches} match)"),
        measure(|| {
            let mut count = 0;
            index.for_each_match(black_box(&topic), |_| count += 1);
            black_box(count);
        }),
        None,
    );
    report(
        "linear scan, 10k filters (for scale)",
        measure(|| {
            let count = filters
                .iter()
                .filter(|f| topic_matches(f, black_box(&topic)))
                .count();
            black_box(count);
        }),
        None,
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then the
    // harness only checks that every case runs once.
    if !std::env::args().any(|arg| arg == "--bench") {
        let packet = publish(110);
        let mut out = BytesMut::new();
        mqtt::encode(&packet, &mut out).expect("encodable");
        assert_eq!(mqtt::decode(&mut out, 1 << 20), Ok(Some(packet)));
        return;
    }
    bench_publish(110, "110 B");
    bench_publish(4_400, "4.4 KB");
    bench_index();
}
