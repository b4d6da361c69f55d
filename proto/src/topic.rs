//! Topic names and topic filters: validation and matching (MQTT 3.1.1
//! section 4.7).
//!
//! A topic name is what a PUBLISH carries; a filter is what a SUBSCRIBE asks
//! for and may hold the wildcards `+` (one level) and `#` (any number of
//! levels, last). Filters that start with a wildcard never match a topic whose
//! first level begins with `$` (such as `$SYS/...`).

/// Length limits applied on top of the syntax rules. Lengths are in bytes of
/// UTF-8, which bounds memory whatever the characters are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    pub max_len_bytes: usize,
    pub max_levels: usize,
}

impl TopicLimits {
    /// Only what the wire format itself allows.
    pub const SPEC: TopicLimits = TopicLimits {
        max_len_bytes: u16::MAX as usize,
        max_levels: usize::MAX,
    };
}

/// Why a topic name or filter is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {len} bytes, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("topic has more than {max} levels")]
    TooManyLevels { max: usize },
    #[error("topic contains U+0000")]
    NullCharacter,
    #[error("wildcard in a topic name")]
    WildcardInName,
    #[error("'#' is not the last level of the filter")]
    MultiLevelWildcardNotLast,
    #[error("wildcard shares a level with other characters")]
    WildcardNotWholeLevel,
}

fn check_common(text: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    if text.is_empty() {
        return Err(TopicError::Empty);
    }
    if text.len() > limits.max_len_bytes {
        return Err(TopicError::TooLong {
            len: text.len(),
            max: limits.max_len_bytes,
        });
    }
    if text.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    if limits.max_levels != usize::MAX && text.split('/').count() > limits.max_levels {
        return Err(TopicError::TooManyLevels {
            max: limits.max_levels,
        });
    }
    Ok(())
}

/// Checks a topic name, as carried by PUBLISH: non-empty, no wildcards.
pub fn validate_topic_name(name: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    check_common(name, limits)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter, as carried by SUBSCRIBE and UNSUBSCRIBE: `+` fills
/// a whole level, `#` fills the whole last level.
pub fn validate_topic_filter(filter: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    check_common(filter, limits)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "#" if levels.peek().is_some() => return Err(TopicError::MultiLevelWildcardNotLast),
            "#" | "+" => {}
            _ if level.contains(['+', '#']) => return Err(TopicError::WildcardNotWholeLevel),
            _ => {}
        }
    }
    Ok(())
}

/// Whether `topic` (a valid topic name) matches `filter` (a valid filter).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for filter_level in filter.split('/') {
        match filter_level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            exact => {
                if topic_levels.next() != Some(exact) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

/// Whether every topic that `filter` matches is matched by `by` as well:
/// `device/+/report` covers `device/X1/report`, `#` does not cover
/// `$SYS/#`, and `a/+` does not cover `a/#`. Both must be valid filters.
pub fn filter_covers(by: &str, filter: &str) -> bool {
    // A filter that starts with a wildcard matches no `$` topic.
    if by.starts_with(['+', '#']) && filter.starts_with('$') {
        return false;
    }
    let mut by_levels = by.split('/');
    let mut filter_levels = filter.split('/');
    loop {
        match (by_levels.next(), filter_levels.next()) {
            // `#` matches the rest, and the parent level too.
            (Some("#"), _) => return true,
            (None, None) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(by_level), Some(level)) => {
                if level == "+" || by_level != level {
                    return false;
                }
            }
        }
    }
}

/// Whether some topic is matched by both filters: `a/+` and `+/b` overlap
/// (`a/b`), `a/#` and `a` overlap (`a`), `#` and `$SYS/#` do not.
pub fn filters_overlap(one: &str, other: &str) -> bool {
    if (one.starts_with(['+', '#']) && other.starts_with('$'))
        || (other.starts_with(['+', '#']) && one.starts_with('$'))
    {
        return false;
    }
    let mut one_levels = one.split('/');
    let mut other_levels = other.split('/');
    loop {
        match (one_levels.next(), other_levels.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(level), Some(other_level)) => {
                if level != other_level {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_and_overlap_follow_the_matching_rules() {
        for (by, filter) in [
            ("#", "a/b"),
            ("#", "#"),
            ("a/#", "a"),
            ("a/#", "a/+/c"),
            ("device/+/report", "device/X1/report"),
            ("+/+", "a/+"),
            ("$SYS/#", "$SYS/broker/load"),
        ] {
            assert!(filter_covers(by, filter), "{by} covers {filter}");
        }
        for (by, filter) in [
            ("#", "$SYS/#"),
            ("+/x", "$SYS/x"),
            ("a/+", "a/#"),
            ("a/+", "a"),
            ("device/X1/report", "device/+/report"),
            ("device/X1/#", "#"),
            ("a", "a/b"),
        ] {
            assert!(!filter_covers(by, filter), "{by} does not cover {filter}");
        }
        for (one, other) in [
            ("a/+", "+/b"),
            ("a/#", "a"),
            ("#", "x"),
            ("+", "+"),
            ("$SYS/#", "$SYS/+"),
        ] {
            assert!(
                filters_overlap(one, other) && filters_overlap(other, one),
                "{one} {other}"
            );
        }
        for (one, other) in [
            ("#", "$SYS/#"),
            ("a/b", "a/c"),
            ("a/+", "a"),
            ("+", "a/b"),
            ("+/#", "$x"),
        ] {
            assert!(
                !filters_overlap(one, other) && !filters_overlap(other, one),
                "{one} {other}"
            );
        }
    }

    #[test]
    fn filters_follow_the_wildcard_rules() {
        let limits = TopicLimits::SPEC;
        for good in [
            "a", "a/b", "#", "+", "a/#", "+/+", "a/+/c", "/", "//", "/#", "$SYS/#", "+/#",
        ] {
            assert_eq!(validate_topic_filter(good, &limits), Ok(()), "{good}");
        }
        assert_eq!(
            validate_topic_filter("a/#/b", &limits),
            Err(TopicError::MultiLevelWildcardNotLast)
        );
        assert_eq!(
            validate_topic_filter("a+", &limits),
            Err(TopicError::WildcardNotWholeLevel)
        );
        assert_eq!(
            validate_topic_filter("a/b#", &limits),
            Err(TopicError::WildcardNotWholeLevel)
        );
        assert_eq!(validate_topic_filter("", &limits), Err(TopicError::Empty));
        assert_eq!(
            validate_topic_filter("a\0", &limits),
            Err(TopicError::NullCharacter)
        );
    }

    #[test]
    fn names_refuse_wildcards_and_honour_limits() {
        let limits = TopicLimits {
            max_len_bytes: 8,
            max_levels: 3,
        };
        assert_eq!(validate_topic_name("a/b/c", &limits), Ok(()));
        assert_eq!(
            validate_topic_name("a/+", &limits),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(
            validate_topic_name("a/#", &limits),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(
            validate_topic_name("abcdefghi", &limits),
            Err(TopicError::TooLong { len: 9, max: 8 })
        );
        assert_eq!(
            validate_topic_name("a/b/c/d", &limits),
            Err(TopicError::TooManyLevels { max: 3 })
        );
    }

    #[test]
    fn matching_follows_the_spec_examples() {
        let cases = [
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/#", "sport", true),
            ("#", "sport", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("#", "$SYS/uptime", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/monitor/Clients", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
            ("a/$b/#", "a/$b/c", true),
            ("device/+/report", "device/01S00A/report", true),
            ("device/+/report", "device/01S00A/request", false),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(
                topic_matches(filter, topic),
                expected,
                "{filter} vs {topic}"
            );
        }
    }
}
