//! The API's messages: what a request asks, what a reply carries. Pure
//! types and their parsing; the server and the client do the IO.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks (and the only one, so far).
pub const VERSION: u32 = 1;

/// The longest request line the server reads; a longer one is refused.
pub const MAX_REQUEST: usize = 64 * 1024;

/// One request, the first line a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// The daemon's version and settings' file, to tell it answers.
    Ping,
    /// `status` of every instance, or of the one `name` names (a name, an
    /// ID or a unique ID prefix).
    Status {
        #[serde(default)]
        name: Option<String>,
    },
    /// `plan`: every instance's next step as the daemon sees it.
    Plan,
    /// `restart`: boot the instance `name` afresh, as declared (its
    /// declaration is not changed). The result says what will happen.
    Restart { name: String },
    /// A stream: every event from now on (of the instance `name` when
    /// given), one reply line each, until the client closes.
    Events {
        #[serde(default)]
        name: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

/// What kind of failure a reply reports, for the client's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Not JSON, not an operation this version knows, too long.
    BadRequest,
    /// Another protocol version.
    Version,
    /// No instance by that name, ID or prefix.
    NotFound,
    /// An ID prefix of several guests.
    Ambiguous,
    /// The daemon failed to answer (a store it cannot read).
    Internal,
    /// Not done, and why (a restart of an instance declared stopped).
    Refused,
}

/// The one reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
}

impl Reply {
    pub fn ok(result: serde_json::Value) -> Reply {
        Reply { v: VERSION, ok: true, result: Some(result), error: None, kind: None }
    }

    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply { v: VERSION, ok: false, result: None, error: Some(message.into()), kind: Some(kind) }
    }
}

/// Reads a request line: a version this build does not speak is told as
/// such even when the rest would not parse in this version.
pub fn parse_request(line: &[u8]) -> Result<Request, Reply> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| Reply::error(ErrorKind::BadRequest, format!("the request is not JSON: {e}")))?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(Reply::error(ErrorKind::Version, format!("protocol version {v} is not spoken here; this daemon speaks {VERSION}")))
        }
        None => return Err(Reply::error(ErrorKind::BadRequest, "the request has no protocol version (\"v\")")),
    }
    serde_json::from_value(value).map_err(|e| Reply::error(ErrorKind::BadRequest, format!("not a request this daemon knows: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(parse_request(br#"{"v":1,"op":"status"}"#).unwrap().op, Op::Status { name: None });
        assert_eq!(parse_request(br#"{"v":1,"op":"status","name":"web"}"#).unwrap().op, Op::Status { name: Some("web".into()) });
        assert_eq!(parse_request(br#"{"v":1,"op":"plan"}"#).unwrap().op, Op::Plan);
        let refused = |line: &[u8]| parse_request(line).unwrap_err();
        let r = refused(b"status please");
        assert_eq!(r.kind, Some(ErrorKind::BadRequest));
        assert!(r.error.unwrap().starts_with("the request is not JSON"));
        let r = refused(br#"{"v":2,"op":"status"}"#);
        assert_eq!((r.kind, r.error.as_deref()), (Some(ErrorKind::Version), Some("protocol version 2 is not spoken here; this daemon speaks 1")));
        assert_eq!(refused(br#"{"op":"status"}"#).kind, Some(ErrorKind::BadRequest));
        let r = refused(br#"{"v":1,"op":"reboot-everything"}"#);
        assert!(r.error.unwrap().contains("unknown variant `reboot-everything`"));
    }

    #[test]
    fn replies_round_trip_with_only_their_fields() {
        let ok = serde_json::to_string(&Reply::ok(serde_json::json!([1]))).unwrap();
        assert_eq!(ok, r#"{"v":1,"ok":true,"result":[1]}"#);
        let err = serde_json::to_string(&Reply::error(ErrorKind::NotFound, "no instance x")).unwrap();
        assert_eq!(err, r#"{"v":1,"ok":false,"error":"no instance x","kind":"not-found"}"#);
        assert_eq!(serde_json::from_str::<Reply>(&err).unwrap(), Reply::error(ErrorKind::NotFound, "no instance x"));
    }
}
