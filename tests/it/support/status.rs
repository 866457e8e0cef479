//! The one assertion of a refusal: its code, what its message names, and its brevity.

use tonic::{Code, Status};

/// `result` failed with `code`, and its message names every one of `needles`. A message is
/// also short whatever the input was: a hostile value is never echoed at length.
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    needles: &[&str],
    context: &str,
) {
    let status = match result {
        Ok(value) => panic!("{context}: expected {code:?}, got OK {value:?}"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        code,
        "{context}: wrong code ({})",
        status.message()
    );
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{context}: message {:?} does not name {needle:?}",
            status.message()
        );
    }
    assert!(
        status.message().len() < 600,
        "{context}: a {}-byte message",
        status.message().len()
    );
}
