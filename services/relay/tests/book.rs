//! The book (`docs/`) against the code, both ways, so that it cannot drift:
//! every configuration key of the edge and the agent, every metric, every
//! close code and every environment variable of the edge that the book
//! names exists in the code, and every one in the code is named in the
//! book. (The book's build and links are checked by `scripts/book`; its
//! snippets run against the demo in `demo.rs`.)
//!
//! The keys the parsers know are learned from the parsers themselves: a
//! table with an unknown key makes serde's `deny_unknown_fields` list the
//! fields it expected, and a table at each of those finds the nested ones.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

const PROBE: &str = "relay_book_probe";

fn page(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../docs")
            .join(path),
    )
    .unwrap()
}

/// The names in backticks after `expected` on the line of an error that
/// says `what` (`unknown field` or `unknown variant`) about the probe.
fn expected_names(error: &str, what: &str) -> Option<Vec<String>> {
    let line = error
        .lines()
        .find(|line| line.contains(&format!("{what} `{PROBE}`")))?;
    let expected = line.split_once("expected")?.1;
    Some(
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
    )
}

/// Every leaf key under `table` (dotted), found by probing `parse`.
fn keys_under(
    parse: &dyn Fn(&str) -> Result<(), String>,
    table: &str,
    found: &mut BTreeSet<String>,
) {
    let header = if table.is_empty() {
        String::new()
    } else {
        format!("[{table}]\n")
    };
    let error = parse(&format!("{header}{PROBE} = 1\n")).expect_err("the probe key is refused");
    let fields = expected_names(&error, "unknown field")
        .unwrap_or_else(|| panic!("no field list for [{table}]: {error}"));
    for field in fields {
        let path = if table.is_empty() {
            field
        } else {
            format!("{table}.{field}")
        };
        let nested = parse(&format!("[{path}]\n{PROBE} = 1\n"))
            .err()
            .and_then(|error| expected_names(&error, "unknown field"));
        if nested.is_some() {
            keys_under(parse, &path, found);
        } else {
            found.insert(path);
        }
    }
}

/// The keys a TOML block names, set or commented out, as dotted paths.
fn keys_in_toml_block(block: &str) -> BTreeSet<String> {
    let mut table = String::new();
    let mut keys = BTreeSet::new();
    for line in block.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(name) = line
            .strip_prefix('[')
            .and_then(|rest| rest.split_once(']'))
            .map(|(name, _)| name)
        {
            table = name.to_owned();
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            keys.insert(format!("{table}.{key}"));
        }
    }
    keys
}

/// The first table column's backticked names in the page's table headed
/// `| {first_column} |`.
fn names_in_table(page: &str, first_column: &str) -> BTreeSet<String> {
    let table = page
        .split(&format!("| {first_column} |"))
        .nth(1)
        .unwrap_or_else(|| panic!("no table headed {first_column:?}"));
    table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .flat_map(|line| {
            let cell = line.split('|').nth(1).unwrap_or_default();
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn assert_same(what: &str, in_code: &BTreeSet<String>, in_book: &BTreeSet<String>) {
    let missing: Vec<_> = in_code.difference(in_book).collect();
    let unknown: Vec<_> = in_book.difference(in_code).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "{what}: in the code but not in the book: {missing:?}; in the book but not in the code: {unknown:?}"
    );
}

/// `printers.<kind>.<key>` as `printers.*.<key>`: every kind has the same
/// keys, and the book shows each key under the kinds it matters for.
fn any_printer_kind(keys: &BTreeSet<String>) -> BTreeSet<String> {
    keys.iter()
        .map(|key| match key.strip_prefix("printers.") {
            Some(rest) => format!(
                "printers.*.{}",
                rest.split_once('.').map_or(rest, |(_, key)| key)
            ),
            None => key.clone(),
        })
        .collect()
}

#[test]
fn every_edge_configuration_key_is_in_the_book_and_nothing_else() {
    let parse = |text: &str| {
        relay_edge::EdgeConfig::from_toml(text)
            .map(|_| ())
            .map_err(|problems| problems.to_string())
    };
    let mut in_code = BTreeSet::new();
    keys_under(&parse, "", &mut in_code);
    assert!(in_code.contains("public.mqtts_listen"), "{in_code:?}");
    assert!(
        in_code.contains("printers.bambu.report_silence_seconds"),
        "{in_code:?}"
    );

    let page = page("reference/edge-config.md");
    let block = page
        .split("<!-- snippet-edge-config -->\n```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the edge configuration block");
    let in_book = keys_in_toml_block(block);
    assert_same(
        "edge configuration keys",
        &any_printer_kind(&in_code),
        &any_printer_kind(&in_book),
    );
    let kinds = |keys: &BTreeSet<String>| -> BTreeSet<String> {
        keys.iter()
            .filter_map(|key| key.strip_prefix("printers."))
            .filter_map(|rest| rest.split('.').next())
            .map(str::to_owned)
            .collect()
    };
    assert_same(
        "printer kinds of [printers.*]",
        &kinds(&in_code),
        &kinds(&in_book),
    );
}

#[test]
fn every_agent_configuration_key_is_in_the_book_and_nothing_else() {
    let parse = |text: &str| {
        relay_agent::config::AgentConfig::from_toml(text)
            .map(|_| ())
            .map_err(|problems| problems.join("\n"))
    };
    let error = parse(&format!("{PROBE} = 1\n")).unwrap_err();
    let sections = expected_names(&error, "unknown field").expect(&error);
    let mut in_code = BTreeSet::new();
    for section in sections {
        if section == "printer" {
            // Internally tagged by `kind`: each kind has its own keys.
            in_code.insert("printer.kind".to_owned());
            let error = parse(&format!("[printer]\nkind = \"{PROBE}\"\n")).unwrap_err();
            let kinds = expected_names(&error, "unknown variant").expect(&error);
            assert!(kinds.len() >= 3, "{kinds:?}");
            for kind in kinds {
                let error =
                    parse(&format!("[printer]\nkind = \"{kind}\"\n{PROBE} = 1\n")).unwrap_err();
                for field in expected_names(&error, "unknown field").expect(&error) {
                    in_code.insert(format!("printer.{field}"));
                }
            }
        } else if parse(&format!("[{section}]\n{PROBE} = 1\n"))
            .err()
            .and_then(|error| expected_names(&error, "unknown field"))
            .is_some()
        {
            keys_under(&parse, &section, &mut in_code);
        } else {
            in_code.insert(section);
        }
    }
    assert!(in_code.contains("edge.quic_probe_seconds"), "{in_code:?}");
    assert!(
        in_code.contains("printer.heartbeat_interval_ms"),
        "{in_code:?}"
    );
    let in_book = names_in_table(&page("reference/agent-config.md"), "key");
    assert_same("agent configuration keys", &in_code, &in_book);
}

#[test]
fn every_metric_is_in_the_book_and_nothing_else() {
    let in_code: BTreeSet<String> = relay_edge::metrics::Metrics::new()
        .names()
        .into_iter()
        .collect();
    assert!(in_code.len() > 20, "{in_code:?}");
    let in_book = names_in_table(&page("reference/metrics.md"), "metric");
    assert_same("metrics", &in_code, &in_book);
}

#[test]
fn every_environment_variable_of_the_edge_is_in_the_book_and_nothing_else() {
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../edge/src/main.rs"))
            .unwrap();
    let variables = |text: &str| -> BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .filter(|word| word.starts_with("RELAY_") && word.len() > "RELAY_".len())
            .map(str::to_owned)
            .collect()
    };
    let in_code = variables(&source);
    assert!(in_code.contains("RELAY_MQTTS_LISTEN"), "{in_code:?}");
    assert_same(
        "the edge's environment variables",
        &in_code,
        &variables(&page("reference/edge-config.md")),
    );
}

#[test]
fn the_close_code_table_is_close_rs() {
    use relay_hub::close::Close;
    let constructors = [
        ("normal", Close::normal()),
        ("draining", Close::draining()),
        ("malformed", Close::malformed("…")),
        ("protocol", Close::protocol("…")),
        ("keep_alive_timeout", Close::keep_alive_timeout()),
        ("topic_alias_invalid", Close::topic_alias_invalid("…")),
        ("text_frame", Close::text_frame()),
        ("unauthorized", Close::unauthorized()),
        ("no_device", Close::no_device()),
        ("revoked", Close::revoked()),
        ("replaced", Close::replaced()),
        ("forbidden", Close::forbidden("…")),
        ("limit", Close::limit("…")),
        (
            "receive_maximum_exceeded",
            Close::receive_maximum_exceeded(1024),
        ),
        ("too_large", Close::too_large()),
        ("internal", Close::internal()),
        ("device_offline", Close::device_offline()),
        ("store_unavailable", Close::store_unavailable()),
        ("printer_unreachable", Close::printer_unreachable("…")),
    ];
    // Every constructor of close.rs is in the list above.
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hub/src/close.rs"),
    )
    .unwrap();
    let impl_block = source
        .split("impl Close {")
        .nth(1)
        .and_then(|rest| rest.split("\n}\n").next())
        .unwrap();
    let in_source: BTreeSet<String> = impl_block
        .split("pub fn ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .map(str::to_owned)
        .collect();
    let listed: BTreeSet<String> = constructors
        .iter()
        .map(|(name, _)| (*name).to_owned())
        .collect();
    assert_same("Close constructors (this test's list)", &in_source, &listed);

    let page = page("reference/close-codes.md");
    for (name, close) in &constructors {
        let row = format!(
            "| `{name}` | {} | `{}` | 0x{:02X} |",
            close.code, close.reason, close.mqtt5.0
        );
        assert!(page.contains(&row), "the book has no row {row}");
    }
    assert_same(
        "close-code rows",
        &listed,
        &names_in_table(&page, "constructor"),
    );
}

/// The `[lan]` blocks of the README's "Home Assistant, Bambuddy and
/// slicers on your LAN" and of the owners' LAN page are what the agent
/// takes, on the ports the text tells apps to use, with the printer's own
/// login (no `lan.username`), as the text says.
#[test]
fn the_lan_settings_in_the_readme_and_the_book_are_what_the_agent_takes() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let section = readme
        .split("### Home Assistant, Bambuddy and slicers on your LAN")
        .nth(1)
        .expect("the README has the LAN section");
    for (name, text) in [
        ("README", section),
        ("owners/lan.md", &page("owners/lan.md")),
    ] {
        let block = text
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .unwrap_or_else(|| panic!("{name}: a toml block"));
        let dir = std::env::temp_dir();
        let ca = dir.join("relay-book-lan-ca.pem");
        std::fs::write(&ca, "").unwrap();
        let config = relay_agent::config::AgentConfig::from_toml(&format!(
            "[edge]\naddress = \"edge.example.com:443\"\nca_file = \"{}\"\ncredential = \"rla_x\"\n\n\
             [printer]\nkind = \"bambu\"\nhost = \"192.168.1.50\"\nserial = \"01P00A000000001\"\n\
             access_code = \"12345678\"\ninsecure = true\n\n{block}",
            ca.display()
        ))
        .unwrap_or_else(|problems| panic!("{name}: {problems:?}"));
        config
            .validate()
            .unwrap_or_else(|problems| panic!("{name}: {problems:?}"));
        let lan = config.lan.expect("a [lan] section");
        assert!(lan.listen.as_deref().unwrap().ends_with(":1883"), "{name}");
        assert!(
            lan.tls_listen.as_deref().unwrap().ends_with(":8883"),
            "{name}"
        );
        assert!(lan.username.is_none(), "{name}: the printer's own login");
        for said in ["1883", "8883", "bblp", "access code"] {
            assert!(text.contains(said), "{name} says {said}");
        }
    }
}
