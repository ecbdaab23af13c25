//! What a valid user is. Requests are parsed into these types before any
//! SQL runs, so the repository only ever sees clean input and every
//! rejection names the offending field.

use crate::{error::ServiceError, validate};

pub const MAX_NAME_CHARS: usize = 200;
/// RFC 5321's limit on a forward path.
pub const MAX_EMAIL_CHARS: usize = 254;

/// A person's display name: trimmed, non-empty, bounded, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    pub fn parse(raw: &str) -> Result<Self, ServiceError> {
        validate::text("name", raw, MAX_NAME_CHARS).map(UserName)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An email address in the shape mail systems accept: one `@`, a non-empty
/// local part of at most 64 characters, a dotted domain, no spaces. Kept as
/// typed (trimmed); uniqueness is decided case-insensitively by the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, ServiceError> {
        let email = raw.trim();
        let invalid = |why: &str| Err(ServiceError::invalid("email", format!("{email:?} {why}")));
        if email.is_empty() {
            return Err(ServiceError::invalid("email", "must not be empty"));
        }
        if email.chars().count() > MAX_EMAIL_CHARS {
            return Err(ServiceError::invalid("email", format!("must be at most {MAX_EMAIL_CHARS} characters")));
        }
        if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return invalid("must not contain spaces or control characters");
        }
        let Some((local, domain)) = email.split_once('@') else {
            return invalid("is not an email address (no @)");
        };
        if local.is_empty() || local.len() > 64 {
            return invalid("needs 1 to 64 characters before the @");
        }
        if domain.contains('@') {
            return invalid("has more than one @");
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 || labels.iter().any(|l| l.is_empty() || l.starts_with('-') || l.ends_with('-')) {
            return invalid("needs a domain like example.org after the @");
        }
        Ok(Email(email.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The fields an update changes; at least one must be set.
#[derive(Debug, Clone)]
pub struct UserChanges {
    pub name: Option<UserName>,
    pub email: Option<Email>,
}

impl UserChanges {
    pub fn parse(name: Option<&str>, email: Option<&str>) -> Result<Self, ServiceError> {
        if name.is_none() && email.is_none() {
            return Err(ServiceError::invalid("name", "set name, email or both: there is nothing to update"));
        }
        Ok(UserChanges { name: name.map(UserName::parse).transpose()?, email: email.map(Email::parse).transpose()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() -> Result<(), ServiceError> {
        assert_eq!(UserName::parse("  Ada  ")?.as_str(), "Ada");
        assert!(UserName::parse("   ").is_err());
        assert!(UserName::parse(&"x".repeat(MAX_NAME_CHARS + 1)).is_err());
        assert!(UserName::parse(&"é".repeat(MAX_NAME_CHARS)).is_ok());
        assert!(UserName::parse("a\u{0}b").is_err());
        Ok(())
    }

    #[test]
    fn emails_need_one_at_and_a_dotted_domain() {
        for good in ["ada@example.org", "a.b+c@mail.example.co.uk", " Ada@Example.ORG "] {
            assert!(Email::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "ada", "ada@", "@example.org", "ada@example", "a@b@c.org", "a da@x.org", "a@.org", "a@x..org"] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
        assert!(Email::parse(&format!("{}@x.org", "a".repeat(65))).is_err());
    }

    #[test]
    fn an_update_must_change_something() {
        assert!(UserChanges::parse(None, None).is_err());
        assert!(UserChanges::parse(Some(""), None).is_err());
        assert!(UserChanges::parse(None, Some("x@y.org")).is_ok());
    }
}
