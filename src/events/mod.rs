//! The record format of `user-events`: CloudEvents 1.0 in the Kafka binary
//! binding. The key is the user id in decimal (so one user's events share a
//! partition and keep their order), the value a protobuf `msys.v1.UserEvent`,
//! and the CloudEvents attributes travel as `ce_*` headers. Producer and
//! consumers both go through this module so the format lives in one place.

pub mod tail;

use std::time::SystemTime;

use prost::Message as _;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};

use crate::pb;

pub const SPEC_VERSION: &str = "1.0";
pub const SOURCE: &str = "/msys/user";
pub const CONTENT_TYPE: &str = "application/protobuf";

/// The kinds of change a user goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Created,
    Updated,
    Deleted,
}

impl EventType {
    pub const ALL: [EventType; 3] = [EventType::Created, EventType::Updated, EventType::Deleted];

    /// The `ce_type` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Created => "msys.user.created.v1",
            EventType::Updated => "msys.user.updated.v1",
            EventType::Deleted => "msys.user.deleted.v1",
        }
    }

    pub fn parse(value: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == value)
    }
}

/// A record ready for the producer: it owns what `FutureRecord` borrows.
pub struct EncodedRecord {
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: OwnedHeaders,
}

/// Why a record on the topic is not a usable user event.
#[derive(thiserror::Error, Debug)]
pub enum DecodeError {
    #[error("record has no value")]
    NoPayload,
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("header {0} is not UTF-8")]
    BadHeader(&'static str),
    #[error("unknown ce_type {0:?}")]
    UnknownType(String),
    #[error("value is not a msys.v1.UserEvent: {0}")]
    BadPayload(#[from] prost::DecodeError),
    #[error("event carries no user")]
    NoUser,
    #[error("headers and value disagree: {0}")]
    Mismatch(String),
    #[error("user {field} {why}")]
    Invalid { field: &'static str, why: String },
}

/// Builds the record for `event`.
pub fn encode(event: &pb::UserEvent) -> EncodedRecord {
    let user_id = event.user.as_ref().map_or(0, |u| u.id);
    let time = event.occurred_at.and_then(|t| SystemTime::try_from(t).ok()).unwrap_or_else(SystemTime::now);
    let time = humantime::format_rfc3339_micros(time).to_string();
    let headers = [
        ("ce_specversion", SPEC_VERSION),
        ("ce_id", event.event_id.as_str()),
        ("ce_source", SOURCE),
        ("ce_type", event.r#type.as_str()),
        ("ce_time", time.as_str()),
        ("content-type", CONTENT_TYPE),
    ]
    .into_iter()
    .fold(OwnedHeaders::new_with_capacity(6), |headers, (key, value)| {
        headers.insert(Header { key, value: Some(value) })
    });
    EncodedRecord { key: user_id.to_string(), payload: event.encode_to_vec(), headers }
}

impl EncodedRecord {
    /// Adds the CloudEvents distributed-tracing extension (`ce_traceparent`,
    /// `ce_tracestate`) when there is a context to carry.
    pub fn with_trace(mut self, trace: &crate::trace::TraceContext) -> Self {
        for (key, value) in
            [(crate::trace::CE_TRACEPARENT, &trace.traceparent), (crate::trace::CE_TRACESTATE, &trace.tracestate)]
        {
            if let Some(value) = value {
                self.headers = self.headers.insert(Header { key, value: Some(value.as_str()) });
            }
        }
        self
    }
}

/// A header's value as text, if the record has it.
pub fn header<'a, M: Message>(message: &'a M, name: &'static str) -> Result<Option<&'a str>, DecodeError> {
    let Some(headers) = message.headers() else {
        return Ok(None);
    };
    match headers.iter().find(|h| h.key == name).and_then(|h| h.value) {
        None => Ok(None),
        Some(bytes) => std::str::from_utf8(bytes).map(Some).map_err(|_| DecodeError::BadHeader(name)),
    }
}

/// A user event read back from a record, checked.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub kind: EventType,
    pub id: uuid::Uuid,
    pub user: pb::User,
    pub event: pb::UserEvent,
}

/// Reads a user event back, checking that headers and value agree.
pub fn decode<M: Message>(message: &M) -> Result<Decoded, DecodeError> {
    let ce_type = header(message, "ce_type")?.ok_or(DecodeError::MissingHeader("ce_type"))?;
    let kind = EventType::parse(ce_type).ok_or_else(|| DecodeError::UnknownType(ce_type.to_owned()))?;
    let ce_id = header(message, "ce_id")?.ok_or(DecodeError::MissingHeader("ce_id"))?;
    let payload = message.payload().ok_or(DecodeError::NoPayload)?;
    let event = pb::UserEvent::decode(payload)?;
    if event.r#type != ce_type {
        return Err(DecodeError::Mismatch(format!("ce_type {ce_type} but value says {}", event.r#type)));
    }
    if event.event_id != ce_id {
        return Err(DecodeError::Mismatch(format!("ce_id {ce_id} but value says {}", event.event_id)));
    }
    let id =
        uuid::Uuid::parse_str(ce_id).map_err(|_| DecodeError::Mismatch(format!("ce_id {ce_id:?} is not a UUID")))?;
    let user = event.user.clone().ok_or(DecodeError::NoUser)?;
    check_user(&user)?;
    Ok(Decoded { kind, id, user, event })
}

/// The limits the user service enforces on what it stores (see
/// `user::domain` and `validate`): a record beyond them was not written by
/// it, and the replica must not try to store it (PostgreSQL refuses a NUL
/// in text with SQLSTATE 22021, for one).
fn check_user(user: &pb::User) -> Result<(), DecodeError> {
    use crate::user::domain::{MAX_EMAIL_CHARS, MAX_NAME_CHARS};
    let invalid = |field, why: String| Err(DecodeError::Invalid { field, why });
    if user.id <= 0 {
        return invalid("id", format!("{} is not a positive id", user.id));
    }
    if user.version <= 0 {
        return invalid("version", format!("{} is not a positive version", user.version));
    }
    for (field, value, max) in [("name", &user.name, MAX_NAME_CHARS), ("email", &user.email, MAX_EMAIL_CHARS)] {
        if value.contains('\0') {
            return invalid(field, "contains a NUL character".to_owned());
        }
        if value.chars().any(char::is_control) {
            return invalid(field, "contains control characters".to_owned());
        }
        if value.chars().count() > max {
            return invalid(field, format!("is longer than {max} characters"));
        }
    }
    Ok(())
}
