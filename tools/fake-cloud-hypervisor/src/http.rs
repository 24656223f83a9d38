//! micro-http's side of the wire, as Cloud Hypervisor's API server speaks
//! it (reference/hypervisors.md §1.1): HTTP/1.0 and 1.1, keep-alive, a
//! request line and each header line within 1024 bytes, bodies only with
//! `Content-Length` (at most 4 MiB) and never chunked, `Expect:
//! 100-continue` honoured. Replies carry `Content-Type` and
//! `Content-Length` only when they have a body; a 204 has neither.

use std::io::{self, BufRead, BufReader, Read, Write};

/// micro-http reads lines through a buffer of this size.
pub const MAX_LINE: usize = 1024;
/// `HTTP_PAYLOAD_MAX_SIZE`.
pub const MAX_BODY: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub version: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// What the descriptors sent with the request are: the TAP's interface
    /// name, or why it is not a TAP. Filled by the server.
    pub fds: Vec<Result<String, String>>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection between requests.
    Closed,
    /// Not a request micro-http would accept; the reply is a 400.
    Malformed(String),
    Io(io::Error),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn read_line<R: BufRead>(r: &mut R) -> Result<Option<String>, ReadError> {
    let mut line = Vec::new();
    let n = r.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_LINE {
        return Err(ReadError::Malformed(format!("a line is longer than {MAX_LINE} bytes")));
    }
    if !line.ends_with(b"\r\n") {
        return Err(ReadError::Malformed("a line does not end with CRLF".into()));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map(Some).map_err(|_| ReadError::Malformed("a line is not UTF-8".into()))
}

/// Reads one request; `writer` gets the interim reply to `Expect: 100-continue`.
pub fn read_request<R: Read, W: Write>(reader: &mut BufReader<R>, writer: &mut W) -> Result<Request, ReadError> {
    let line = read_line(reader)?.ok_or(ReadError::Closed)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(ReadError::Malformed(format!("bad request line {line:?}")));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(ReadError::Malformed(format!("unsupported version {version}")));
    }
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?.ok_or_else(|| ReadError::Malformed("headers end early".into()))?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ReadError::Malformed(format!("bad header {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut request = Request { method: method.into(), path: target.into(), version: version.into(), headers, body: Vec::new(), fds: Vec::new() };
    if request.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        // micro-http parses the header but never de-chunks the body.
        return Err(ReadError::Malformed("chunked transfer encoding is not supported".into()));
    }
    let length = match request.header("content-length") {
        None => 0,
        Some(v) => v.parse::<usize>().map_err(|_| ReadError::Malformed(format!("bad Content-Length {v:?}")))?,
    };
    if length > MAX_BODY {
        return Err(ReadError::Malformed(format!("a body of {length} bytes is over the {MAX_BODY}-byte limit")));
    }
    if length > 0 && request.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        writer.flush()?;
    }
    request.body = vec![0; length];
    reader.read_exact(&mut request.body)?;
    Ok(request)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// `None`: no body and no length headers at all (a 204's shape).
    pub body: Option<Vec<u8>>,
}

impl Response {
    pub fn no_content() -> Response {
        Response { status: 204, body: None }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response { status, body: Some(value.to_string().into_bytes()) }
    }

    /// A 200 whose body is empty: `Content-Length: 0` (what `vmm.shutdown` sends).
    pub fn empty_ok() -> Response {
        Response { status: 200, body: Some(Vec::new()) }
    }

    pub fn bare(status: u16) -> Response {
        Response { status, body: None }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "",
    }
}

pub fn write_response<W: Write>(w: &mut W, response: &Response) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n",
        response.status,
        reason(response.status)
    );
    if let Some(body) = &response.body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if let Some(body) = &response.body {
        w.write_all(body)?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> (Result<Request, ReadError>, Vec<u8>) {
        let mut out = Vec::new();
        let r = read_request(&mut BufReader::new(raw), &mut out);
        (r, out)
    }

    #[test]
    fn a_request_with_a_body() {
        let (r, out) = parse(b"PUT /api/v1/vm.resize HTTP/1.1\r\nHost: localhost\r\nContent-LENGTH: 17\r\n\r\n{\"desired_ram\":1}");
        let r = r.unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/api/v1/vm.resize"));
        assert_eq!(r.body, b"{\"desired_ram\":1}");
        assert_eq!(r.header("content-length"), Some("17"));
        assert!(out.is_empty());
    }

    #[test]
    fn chunked_and_oversized_requests_are_refused() {
        let (r, _) = parse(b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
        assert!(matches!(r, Err(ReadError::Malformed(m)) if m.contains("chunked")));
        let (r, _) = parse(format!("PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1).as_bytes());
        assert!(matches!(r, Err(ReadError::Malformed(m)) if m.contains("limit")));
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE));
        assert!(matches!(parse(long.as_bytes()).0, Err(ReadError::Malformed(_))));
        assert!(matches!(parse(b"").0, Err(ReadError::Closed)));
    }

    #[test]
    fn expect_continue_is_answered_before_the_body() {
        let (r, out) = parse(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(r.unwrap().body, b"{}");
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn replies_have_lengths_only_with_bodies() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::no_content()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 204 No Content\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n"
        );
        let mut out = Vec::new();
        write_response(&mut out, &Response::empty_ok()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("Content-Length: 0\r\n\r\n"), "{text}");
    }
}
