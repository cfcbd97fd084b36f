//! Test tokens: JWTs signed with the test-only keys in `tests/fixtures/jwt`
//! (README there), so tests of `jwt_claim:` rules send real signed tokens.
//!
//! The helpers are `src/jwt/test_tokens.rs`, included here by path: the
//! verifier's unit tests mint their tokens with the same file, and the
//! library must not depend on `tests/`.

#[allow(
    dead_code,
    reason = "token_without_kid is for the verifier's unit tests only"
)]
#[path = "../../src/jwt/test_tokens.rs"]
mod test_tokens;

pub use self::test_tokens::*;
