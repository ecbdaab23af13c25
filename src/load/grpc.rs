//! A lean unary gRPC client for the engine's per-request calls, straight on
//! the `h2` crate.
//!
//! Why not tonic's `Channel`: each call through it crosses a `Buffer` (a
//! channel hop to a worker task and a oneshot back), a stack of boxed layers,
//! and hyper's client, which spawns a task per request to stream the body.
//! At tens of thousands of calls a second on a machine shared with the
//! system under test, that overhead is what the load tool measured instead of
//! the target (`scripts/bench-load.sh` compares it with h2load). Here a call
//! is one `send_request` with the whole body sent at once, and the response
//! is read where it is awaited: no extra task, no extra hop. Messages are
//! still prost's, the paths and codes those of the generated clients.
//!
//! The connection reconnects by itself: a call that finds it gone fails with
//! UNAVAILABLE (that is what the target did) and a background task dials again.

use std::{
    sync::{
        Arc, RwLock, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::{HeaderMap, HeaderValue, Request, Uri, header};
use prost::{
    Message,
    bytes::{Bytes, BytesMut},
};
use tonic::Code;

/// A call's failure: the gRPC code and, for the scenarios that act on it, the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub code: Code,
    pub message: String,
}

impl CallError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        CallError { code, message: message.into() }
    }
}

/// A method's full URI (scheme, authority and path), built once per connection.
#[derive(Clone)]
pub struct Method(Uri);

/// One HTTP/2 connection to a target; cheap to share, calls multiplex on it.
pub struct Conn {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port` to dial, and the origin requests carry.
    authority: String,
    send: RwLock<h2::client::SendRequest<Bytes>>,
    redialing: AtomicBool,
}

/// The HTTP/2 windows: large, so flow control never paces a load test.
const WINDOW: u32 = 8 * 1024 * 1024;

async fn dial(authority: &str) -> std::io::Result<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(authority).await?;
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .handshake(tcp)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "load connection closed");
        }
    });
    Ok(send)
}

impl Conn {
    /// Dials `addr` (`http://host:port` or `host:port`), within `timeout`.
    pub async fn connect(addr: &str, timeout: Duration) -> std::io::Result<Conn> {
        let authority = authority_of(addr)?;
        let send = tokio::time::timeout(timeout, dial(&authority)).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no connection within {timeout:?}"))
        })??;
        Ok(Conn { inner: Arc::new(Inner { authority, send: RwLock::new(send), redialing: AtomicBool::new(false) }) })
    }

    /// The URI of `path` (e.g. `/msys.v1.UserService/GetUser`) on this connection's target.
    pub fn method(&self, path: &'static str) -> Method {
        let uri = Uri::builder().scheme("http").authority(self.inner.authority.as_str()).path_and_query(path).build();
        // The authority was parsed when dialling and the paths are constants.
        Method(uri.unwrap_or_else(|_| Uri::from_static("http://invalid/")))
    }

    /// One unary call: `request` to `method`, decoded as `Resp`.
    pub async fn unary<Req: Message, Resp: Message + Default>(
        &self,
        method: &Method,
        request: &Req,
    ) -> Result<Resp, CallError> {
        let send = self.inner.send.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut send = match send.ready().await {
            Ok(send) => send,
            Err(e) => return Err(self.lost(e)),
        };
        let mut head = Request::new(());
        *head.method_mut() = http::Method::POST;
        *head.uri_mut() = method.0.clone();
        let headers = head.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        let (response, mut body_out) = send.send_request(head, false).map_err(|e| self.lost(e))?;
        body_out.send_data(frame(request), true).map_err(|e| self.lost(e))?;
        let response = response.await.map_err(|e| stream_error(&e))?;
        let (parts, mut body) = response.into_parts();
        if parts.status != http::StatusCode::OK {
            return Err(CallError::new(http_code(parts.status), format!("HTTP {}", parts.status)));
        }
        // Trailers-only: the status is in the headers and there is no body.
        if let Some(error) = status_of(&parts.headers) {
            return error.map(|()| Resp::default());
        }
        // A unary response is one DATA frame, almost always: keep it, copy only if more come.
        let mut payload = Bytes::new();
        let mut joined: Option<BytesMut> = None;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| stream_error(&e))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            match &mut joined {
                None if payload.is_empty() => payload = chunk,
                None => {
                    let mut all = BytesMut::from(&payload[..]);
                    all.extend_from_slice(&chunk);
                    joined = Some(all);
                }
                Some(all) => all.extend_from_slice(&chunk),
            }
        }
        let payload = joined.map_or(payload, BytesMut::freeze);
        let trailers = body.trailers().await.map_err(|e| stream_error(&e))?;
        match trailers.as_ref().and_then(status_of) {
            Some(Ok(())) => decode(&payload),
            Some(Err(error)) => Err(error),
            None => Err(CallError::new(Code::Internal, "the response has no grpc-status")),
        }
    }

    /// The connection failed: say UNAVAILABLE and dial again in the background, once.
    fn lost(&self, error: h2::Error) -> CallError {
        if !self.inner.redialing.swap(true, Ordering::AcqRel) {
            tokio::spawn(redial(Arc::downgrade(&self.inner)));
        }
        CallError::new(Code::Unavailable, format!("connection to {} lost: {error}", self.inner.authority))
    }
}

/// Dials until it succeeds or the connection is no longer used.
async fn redial(inner: Weak<Inner>) {
    loop {
        let Some(authority) = inner.upgrade().map(|i| i.authority.clone()) else { return };
        if let Ok(Ok(send)) = tokio::time::timeout(Duration::from_secs(2), dial(&authority)).await {
            if let Some(inner) = inner.upgrade() {
                *inner.send.write().unwrap_or_else(|p| p.into_inner()) = send;
                inner.redialing.store(false, Ordering::Release);
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn authority_of(addr: &str) -> std::io::Result<String> {
    let invalid = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr:?}: {why}"));
    let rest = match addr.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => return Err(invalid(&format!("scheme {scheme} is not supported, use http://"))),
        None => addr,
    };
    let authority = rest.trim_end_matches('/');
    let parsed: http::uri::Authority = authority.parse().map_err(|_| invalid("not host:port"))?;
    if parsed.port_u16().is_none() {
        return Err(invalid("no port"));
    }
    Ok(authority.to_owned())
}

/// A gRPC message frame: uncompressed flag, big-endian length, the message.
fn frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    // The buffer was sized for the message, so encoding cannot run out of room.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

fn decode<Resp: Message + Default>(payload: &[u8]) -> Result<Resp, CallError> {
    let Some((&[flag, a, b, c, d], message)) = payload.split_first_chunk::<5>() else {
        return Err(CallError::new(Code::Internal, "the response has no message"));
    };
    if flag != 0 {
        return Err(CallError::new(Code::Internal, "the response is compressed, which was not asked for"));
    }
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    let message = message.get(..len).ok_or_else(|| CallError::new(Code::Internal, "the response is truncated"))?;
    Resp::decode(message).map_err(|e| CallError::new(Code::Internal, format!("undecodable response: {e}")))
}

/// `grpc-status` (and `grpc-message` when it is not OK), if present.
fn status_of(headers: &HeaderMap) -> Option<Result<(), CallError>> {
    let code = Code::from_bytes(headers.get("grpc-status")?.as_bytes());
    if code == Code::Ok {
        return Some(Ok(()));
    }
    let message = headers.get("grpc-message").map_or_else(String::new, |m| percent_decode(m.as_bytes()));
    Some(Err(CallError::new(code, message)))
}

/// grpc-message is percent-encoded (gRPC's HTTP/2 protocol spec).
fn percent_decode(raw: &[u8]) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match (raw[i], raw.get(i + 1).copied().and_then(hex), raw.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A stream reset or a broken connection, as gRPC clients report it.
fn stream_error(error: &h2::Error) -> CallError {
    let code = match error.reason() {
        Some(h2::Reason::CANCEL) => Code::Cancelled,
        Some(h2::Reason::REFUSED_STREAM) | None => Code::Unavailable,
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(_) => Code::Internal,
    };
    CallError::new(code, error.to_string())
}

/// gRPC's mapping of HTTP statuses for responses that are not gRPC.
fn http_code(status: http::StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn a_message_survives_the_frame() {
        let user = pb::GetUserRequest { id: 42 };
        let framed = frame(&user);
        assert_eq!(framed[0], 0);
        assert_eq!(u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize, framed.len() - 5);
        assert_eq!(decode::<pb::GetUserRequest>(&framed), Ok(user));
        assert_eq!(decode::<pb::GetUserRequest>(&framed[..3]).map_err(|e| e.code), Err(Code::Internal));
    }

    #[test]
    fn status_and_message_come_from_the_trailers() {
        let mut trailers = HeaderMap::new();
        assert_eq!(status_of(&trailers), None);
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(status_of(&trailers), Some(Ok(())));
        trailers.insert("grpc-status", HeaderValue::from_static("9"));
        trailers.insert("grpc-message", HeaderValue::from_static("user 7 does not exist %E2%9C%93 100%25"));
        assert_eq!(
            status_of(&trailers),
            Some(Err(CallError::new(Code::FailedPrecondition, "user 7 does not exist ✓ 100%")))
        );
    }

    #[test]
    fn only_plain_http_targets_with_a_port_are_dialled() {
        assert_eq!(authority_of("http://127.0.0.1:50051").ok().as_deref(), Some("127.0.0.1:50051"));
        assert_eq!(authority_of("localhost:1/").ok().as_deref(), Some("localhost:1"));
        assert!(authority_of("https://x:1").is_err_and(|e| e.to_string().contains("use http://")));
        assert!(authority_of("http://x").is_err_and(|e| e.to_string().contains("no port")));
    }
}
