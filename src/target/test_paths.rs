//! (Tests only.) Random request paths for the property tests of path
//! normalisation, shared by the unit tests here and the black-box test
//! `tests/it/hardening.rs` (which includes this file by path), so both
//! explore the same paths.

use proptest::prelude::*;

/// One path segment: empty, `.`, `..` (plain or escaped), unreserved
/// text, escapes of anything, and text around escapes of unreserved and
/// reserved characters, including the refused ones (`%2F`, `%5C`, `%00`).
pub(crate) fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just("%2e".to_owned()),
        Just("%2E%2e".to_owned()),
        Just("a".to_owned()),
        "[a-zA-Z0-9._~-]{1,4}",
        "(%[0-9a-fA-F]{2}){1,2}",
        "[a-z]{0,2}%(41|61|7e|7E|3f|3F|2f|5c|5C|00|25|2E|20|C3%A9)[a-z]{0,2}",
    ]
}

/// An absolute path of up to `max_segments` segments.
pub(crate) fn path(max_segments: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(segment(), 0..=max_segments)
        .prop_map(|segments| format!("/{}", segments.join("/")))
}
