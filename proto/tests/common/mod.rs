//! What several of proto's integration tests share.

/// Bytes from hex text; white space between digits is ignored, so test
/// vectors can be laid out field by field.
pub fn bytes_of(hex: &str) -> Vec<u8> {
    let hex: String = hex.split_whitespace().collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("test hex"))
        .collect()
}
