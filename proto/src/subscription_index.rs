//! A trie from topic filters to subscribers.
//!
//! Each filter level is a trie edge, with `+` and `#` kept apart from exact
//! levels. Looking up a topic walks only the branches that can match it, so
//! its cost grows with the topic's depth and the number of matching filters,
//! not with the number of unrelated filters. Every walk is iterative: a deep
//! filter cannot overflow the stack.

use std::collections::HashMap;

/// Maps topic filters to subscribers of type `S` (a session id, a channel).
///
/// Filters must be valid ([`crate::topic::validate_topic_filter`]); the index
/// does not check them again.
#[derive(Debug)]
pub struct SubscriptionIndex<S> {
    root: Node<S>,
    entries: usize,
}

#[derive(Debug)]
struct Node<S> {
    exact: HashMap<Box<str>, Node<S>>,
    single_level: Option<Box<Node<S>>>,
    /// Subscribers whose filter ends at this node.
    ending_here: Vec<S>,
    /// Subscribers whose filter ends with `#` right below this node.
    multi_level: Vec<S>,
}

impl<S> Default for Node<S> {
    fn default() -> Self {
        Node {
            exact: HashMap::new(),
            single_level: None,
            ending_here: Vec::new(),
            multi_level: Vec::new(),
        }
    }
}

impl<S> Node<S> {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.exact.is_empty()
            && self.single_level.is_none()
            && self.ending_here.is_empty()
            && self.multi_level.is_empty()
    }

    fn child(&self, level: &str) -> Option<&Node<S>> {
        match level {
            "+" => self.single_level.as_deref(),
            exact => self.exact.get(exact),
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<S>> {
        match level {
            "+" => self.single_level.as_deref_mut(),
            exact => self.exact.get_mut(exact),
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node<S> {
        match level {
            "+" => self.single_level.get_or_insert_with(Default::default),
            exact => self.exact.entry(exact.into()).or_default(),
        }
    }

    fn remove_child(&mut self, level: &str) {
        match level {
            "+" => self.single_level = None,
            exact => {
                self.exact.remove(exact);
            }
        }
    }

    fn take_children(&mut self) -> Vec<Node<S>> {
        let mut children: Vec<Node<S>> = self.exact.drain().map(|(_, child)| child).collect();
        if let Some(child) = self.single_level.take() {
            children.push(*child);
        }
        children
    }

    fn child_count(&self) -> usize {
        self.exact.len() + usize::from(self.single_level.is_some())
    }
}

// The default drop would recurse once per level; a deep filter would then
// overflow the stack when its branch is dropped.
impl<S> Drop for Node<S> {
    fn drop(&mut self) {
        let mut pending = self.take_children();
        while let Some(mut node) = pending.pop() {
            pending.extend(node.take_children());
        }
    }
}

/// Splits a filter into the levels that are trie edges and whether it ends
/// with `#` (which is kept in the node above it).
fn split_filter(filter: &str) -> (Vec<&str>, bool) {
    let mut levels: Vec<&str> = filter.split('/').collect();
    let multi_level = levels.last() == Some(&"#");
    if multi_level {
        levels.pop();
    }
    (levels, multi_level)
}

impl<S> Default for SubscriptionIndex<S> {
    fn default() -> Self {
        SubscriptionIndex {
            root: Node::default(),
            entries: 0,
        }
    }
}

impl<S: PartialEq> SubscriptionIndex<S> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of (filter, subscriber) entries.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Adds `subscriber` under `filter`. Returns false (and changes nothing)
    /// when that pair is already there.
    pub fn insert(&mut self, filter: &str, subscriber: S) -> bool {
        let (levels, multi_level) = split_filter(filter);
        let mut node = &mut self.root;
        for level in levels {
            node = node.child_or_insert(level);
        }
        let list = if multi_level {
            &mut node.multi_level
        } else {
            &mut node.ending_here
        };
        if list.contains(&subscriber) {
            return false;
        }
        list.push(subscriber);
        self.entries += 1;
        true
    }

    /// Removes `subscriber` from `filter`, pruning branches left empty.
    /// Returns whether the pair was there.
    pub fn remove(&mut self, filter: &str, subscriber: &S) -> bool {
        let (levels, multi_level) = split_filter(filter);

        // Find the node; on the way, note the last node that must survive:
        // one that holds subscribers or another branch besides this path.
        let mut node = &self.root;
        let mut keep_depth = 0;
        for (depth, level) in levels.iter().enumerate() {
            if !node.ending_here.is_empty()
                || !node.multi_level.is_empty()
                || node.child_count() > 1
            {
                keep_depth = depth;
            }
            match node.child(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        let list = if multi_level {
            &node.multi_level
        } else {
            &node.ending_here
        };
        let Some(position) = list.iter().position(|s| s == subscriber) else {
            return false;
        };
        let leaf_left_empty = list.len() == 1
            && node.child_count() == 0
            && if multi_level {
                node.ending_here.is_empty()
            } else {
                node.multi_level.is_empty()
            };

        let mut node = &mut self.root;
        for (depth, level) in levels.iter().enumerate() {
            if leaf_left_empty && depth == keep_depth {
                // Everything below here only led to this one entry.
                node.remove_child(level);
                self.entries -= 1;
                return true;
            }
            match node.child_mut(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        let list = if multi_level {
            &mut node.multi_level
        } else {
            &mut node.ending_here
        };
        list.swap_remove(position);
        self.entries -= 1;
        true
    }

    /// Calls `visit` for every entry whose filter matches `topic` (a valid
    /// topic name). A subscriber that holds several matching filters is
    /// visited once per filter; callers that deliver once per subscriber
    /// deduplicate.
    pub fn for_each_match<'a>(&'a self, topic: &str, mut visit: impl FnMut(&'a S)) {
        self.walk_matching(topic, |subscribers| subscribers.iter().for_each(&mut visit));
    }

    /// Every entry whose filter matches `topic`; see [`Self::for_each_match`].
    pub fn matches(&self, topic: &str) -> Vec<&S> {
        let mut found = Vec::new();
        self.walk_matching(topic, |subscribers| found.extend(subscribers));
        found
    }

    /// Calls `visit` with each list of subscribers whose filter matches.
    fn walk_matching<'a>(&'a self, topic: &str, mut visit: impl FnMut(&'a [S])) {
        let levels: Vec<&str> = topic.split('/').collect();
        // Wildcards in the first level never match a `$` topic.
        let dollar_topic = topic.starts_with('$');
        let mut pending: Vec<(&'a Node<S>, usize)> = vec![(&self.root, 0)];
        while let Some((node, depth)) = pending.pop() {
            let wildcards_allowed = depth > 0 || !dollar_topic;
            if wildcards_allowed {
                visit(&node.multi_level);
            }
            let Some(level) = levels.get(depth) else {
                visit(&node.ending_here);
                continue;
            };
            if let Some(child) = node.exact.get(*level) {
                pending.push((child, depth + 1));
            }
            if wildcards_allowed && let Some(child) = node.single_level.as_deref() {
                pending.push((child, depth + 1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::topic_matches;

    fn sorted(mut found: Vec<&u32>) -> Vec<u32> {
        found.sort();
        found.into_iter().copied().collect()
    }

    #[test]
    fn finds_every_matching_filter_and_no_other() {
        let mut index = SubscriptionIndex::new();
        let filters = [
            "a/b", "a/+", "a/#", "#", "+/b", "a/b/c", "$SYS/#", "+/+", "a",
        ];
        for (id, filter) in filters.iter().enumerate() {
            assert!(index.insert(filter, id as u32));
        }
        for topic in ["a/b", "a", "a/b/c", "$SYS/x", "x/b", "a/", "/b", "$SYS"] {
            let expected: Vec<u32> = filters
                .iter()
                .enumerate()
                .filter(|(_, filter)| topic_matches(filter, topic))
                .map(|(id, _)| id as u32)
                .collect();
            assert_eq!(sorted(index.matches(topic)), expected, "{topic}");
        }
    }

    #[test]
    fn duplicate_insert_and_unknown_remove_change_nothing() {
        let mut index = SubscriptionIndex::new();
        assert!(index.insert("a/+", 1));
        assert!(!index.insert("a/+", 1));
        assert!(index.insert("a/+", 2));
        assert_eq!(index.len(), 2);
        assert!(!index.remove("a/+", &3));
        assert!(!index.remove("a/b", &1));
        assert!(!index.remove("a/+/c", &1));
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn removing_everything_prunes_the_trie() {
        let mut index = SubscriptionIndex::new();
        let filters = ["a/b/c/d", "a/b", "a/#", "a/b/#", "+/b/+", "#", "a/b/c/d/e"];
        for filter in filters {
            index.insert(filter, 7u32);
        }
        for (removed, filter) in filters.iter().enumerate() {
            assert!(index.remove(filter, &7), "{filter}");
            let remaining = &filters[removed + 1..];
            for topic in ["a/b/c/d", "a/b", "x/b/y", "a/b/c/d/e"] {
                let expected = remaining.iter().filter(|f| topic_matches(f, topic)).count();
                assert_eq!(
                    index.matches(topic).len(),
                    expected,
                    "{topic} after removing {filter}"
                );
            }
        }
        assert!(index.is_empty());
        assert!(
            index.root.is_empty(),
            "trie keeps empty nodes: {:?}",
            index.root
        );
    }

    #[test]
    fn removal_keeps_siblings_and_ancestors_with_subscribers() {
        let mut index = SubscriptionIndex::new();
        index.insert("a/b/c", 1u32);
        index.insert("a/b/d", 2);
        index.insert("a", 3);
        assert!(index.remove("a/b/c", &1));
        assert_eq!(sorted(index.matches("a/b/d")), vec![2]);
        assert_eq!(sorted(index.matches("a")), vec![3]);
        assert!(index.matches("a/b/c").is_empty());
        assert!(index.remove("a/b/d", &2));
        assert_eq!(sorted(index.matches("a")), vec![3]);
        assert!(index.root.exact["a"].exact.is_empty());
    }

    #[test]
    fn a_very_deep_filter_does_not_overflow_the_stack() {
        let mut index = SubscriptionIndex::new();
        let deep = vec!["x"; 100_000].join("/");
        index.insert(&deep, 1u32);
        index.insert(&format!("{deep}/#"), 2);
        assert_eq!(sorted(index.matches(&deep)), vec![1, 2]);
        assert!(index.remove(&deep, &1));
        assert!(index.remove(&format!("{deep}/#"), &2));
        assert!(index.root.is_empty());
        index.insert(&deep, 3);
        drop(index);
    }
}
