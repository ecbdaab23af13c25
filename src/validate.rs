//! Request checks both services share: ids and paging. Each rejection
//! names the offending field, as clients see it in INVALID_ARGUMENT.

use crate::error::ServiceError;

pub const DEFAULT_PAGE_SIZE: i32 = 50;
pub const MAX_PAGE_SIZE: i32 = 1000;

/// A database id as a client sent it: ids start at 1.
pub fn parse_id(field: &'static str, id: i64) -> Result<i64, ServiceError> {
    if id <= 0 {
        return Err(ServiceError::invalid(field, format!("must be a positive id, got {id}")));
    }
    Ok(id)
}

/// Page size and position of a listing. The token is the last id of the
/// previous page (listings are ordered by id, ascending or descending);
/// clients treat it as opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub size: i32,
    pub after: Option<i64>,
}

impl Page {
    pub fn parse(page_size: i32, page_token: &str) -> Result<Self, ServiceError> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if (1..=MAX_PAGE_SIZE).contains(&n) => n,
            n => {
                return Err(ServiceError::invalid(
                    "page_size",
                    format!("must be between 1 and {MAX_PAGE_SIZE} (or 0 for {DEFAULT_PAGE_SIZE}), got {n}"),
                ));
            }
        };
        let after = if page_token.is_empty() {
            None
        } else {
            match page_token.parse::<i64>() {
                Ok(id) if id > 0 => Some(id),
                _ => {
                    return Err(ServiceError::invalid("page_token", "is not a token this server issued"));
                }
            }
        };
        Ok(Page { size, after })
    }

    /// Keeps the first `size` of `rows` (fetched with a limit of size + 1)
    /// and returns the next page's token if there were more.
    pub fn cut<T>(&self, rows: &mut Vec<T>, id: impl Fn(&T) -> i64) -> Option<String> {
        if rows.len() <= self.size as usize {
            return None;
        }
        rows.truncate(self.size as usize);
        rows.last().map(|last| id(last).to_string())
    }
}

/// Free text a person typed (a name, a product): trimmed, non-empty,
/// at most `max` characters, no control characters.
pub fn text(field: &'static str, raw: &str, max: usize) -> Result<String, ServiceError> {
    let value = raw.trim();
    if value.is_empty() {
        return Err(ServiceError::invalid(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(ServiceError::invalid(field, format!("must be at most {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(ServiceError::invalid(field, "must not contain control characters"));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_default_and_reject_out_of_range() -> Result<(), ServiceError> {
        assert_eq!(Page::parse(0, "")?, Page { size: DEFAULT_PAGE_SIZE, after: None });
        assert_eq!(Page::parse(10, "42")?, Page { size: 10, after: Some(42) });
        assert!(Page::parse(-1, "").is_err());
        assert!(Page::parse(MAX_PAGE_SIZE + 1, "").is_err());
        assert!(Page::parse(10, "abc").is_err());
        assert!(Page::parse(10, "-5").is_err());
        Ok(())
    }

    #[test]
    fn ids_are_positive() {
        assert!(parse_id("id", 1).is_ok());
        assert!(parse_id("id", 0).is_err());
        assert!(parse_id("id", -1).is_err());
    }
}
