//! Property tests of filter coverage and overlap against topic matching:
//! `filter_covers(by, f)` must mean that every topic `f` matches, `by`
//! matches too; `filters_overlap(a, b)` false must mean that no topic
//! matches both. Topics and filters are drawn from a small alphabet so that
//! matches are common.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use proptest::prelude::*;
use relay_proto::topic::{filter_covers, filters_overlap, topic_matches};

fn topic_level() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just(""), Just("$s")].prop_map(str::to_owned)
}

fn topic() -> impl Strategy<Value = String> {
    proptest::collection::vec(topic_level(), 1..4).prop_map(|levels| levels.join("/"))
}

fn filter() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(
            prop_oneof![
                3 => topic_level(),
                2 => Just("+".to_owned()),
            ],
            0..4,
        ),
        any::<bool>(),
    )
        .prop_filter_map("non-empty", |(mut levels, hash)| {
            if hash {
                levels.push("#".to_owned());
            }
            (!levels.is_empty()).then(|| levels.join("/"))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn coverage_is_sound(by in filter(), inner in filter(), topics in proptest::collection::vec(topic(), 16)) {
        if filter_covers(&by, &inner) {
            for topic in &topics {
                if topic_matches(&inner, topic) {
                    prop_assert!(topic_matches(&by, topic), "{by} covers {inner} but not {topic}");
                }
            }
        }
    }

    #[test]
    fn a_filter_covers_itself_and_a_topic_it_matches(inner in filter(), topic in topic()) {
        prop_assert!(filter_covers(&inner, &inner));
        if topic_matches(&inner, &topic) {
            prop_assert!(filter_covers(&inner, &topic));
            prop_assert!(filters_overlap(&inner, &topic));
        }
    }

    #[test]
    fn disjoint_filters_share_no_topic(one in filter(), other in filter(), topics in proptest::collection::vec(topic(), 16)) {
        prop_assert_eq!(filters_overlap(&one, &other), filters_overlap(&other, &one));
        if !filters_overlap(&one, &other) {
            for topic in &topics {
                prop_assert!(!(topic_matches(&one, topic) && topic_matches(&other, topic)), "{one} and {other} share {topic}");
            }
        }
    }
}
