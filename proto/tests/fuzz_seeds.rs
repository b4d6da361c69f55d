//! Replays the fuzz targets' seed corpora (`proto/fuzz/corpus/*/seed-*`)
//! through the same checks the fuzzers make, so that CI exercises them
//! without libFuzzer.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../fuzz/oracles.rs"]
mod oracles;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("corpus entry").path();
        let is_seed = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("seed-"));
        if is_seed {
            check(&std::fs::read(&path).expect("seed file"));
            count += 1;
        }
    }
    assert!(count >= 10, "only {count} seeds in {}", dir.display());
}

#[test]
fn mqtt_seeds_pass_the_fuzz_checks() {
    replay("mqtt_decode", oracles::check_mqtt_decode);
}

#[test]
fn tunnel_seeds_pass_the_fuzz_checks() {
    replay("tunnel_decode", oracles::check_tunnel_decode);
}

#[test]
fn mqtt5_seeds_pass_the_fuzz_checks() {
    replay("mqtt5_decode", oracles::check_mqtt5_decode);
}
