//! The little HTTP/1.1 the API needs, over any byte stream (the TLS
//! session): request and response heads parsed with `httparse` (pure
//! functions on bytes), one request per connection (`Connection: close`),
//! bodies sized by `Content-Length` or, for a streamed response, ended by
//! the close.

use std::io::{self, BufRead};

/// Longest request or response head accepted (line ends included).
pub const MAX_HEAD: usize = 16 << 10;
/// Most headers in a head.
const MAX_HEADERS: usize = 32;

/// Why a head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The stream failed while the head was read.
    #[error("reading the HTTP head: {0}")]
    Read(#[source] io::Error),
    /// The peer closed the connection before a complete head.
    #[error("the connection closed before a complete HTTP head")]
    Closed,
    /// More than [`MAX_HEAD`] bytes without the empty line.
    #[error("HTTP head longer than {MAX_HEAD} bytes")]
    TooLong,
    /// Not HTTP/1.1 as this API speaks it.
    #[error("malformed HTTP head: {0}")]
    Malformed(String),
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, `DELETE`.
    pub method: String,
    /// The path, query string included.
    pub path: String,
    /// Headers as sent (names compared without case by [`Request::header`]).
    pub headers: Vec<(String, String)>,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers as sent.
    pub headers: Vec<(String, String)>,
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `Content-Length`, if given: a decimal number; absent is None. A
/// `Transfer-Encoding` is refused (this API never sends one).
fn content_length(headers: &[(String, String)]) -> Result<Option<u64>, HttpError> {
    if find(headers, "transfer-encoding").is_some() {
        return Err(HttpError::Malformed(
            "Transfer-Encoding is not accepted: send a Content-Length".into(),
        ));
    }
    let all: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_str())
        .collect();
    match all.as_slice() {
        [] => Ok(None),
        [v] if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => v
            .parse()
            .map(Some)
            .map_err(|_| HttpError::Malformed(format!("Content-Length {v:?} is too large"))),
        [v] => Err(HttpError::Malformed(format!("bad Content-Length {v:?}"))),
        _ => Err(HttpError::Malformed("more than one Content-Length".into())),
    }
}

impl Request {
    /// The value of header `name` (any case), the first if repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// The body's length from `Content-Length` (None: no body).
    pub fn content_length(&self) -> Result<Option<u64>, HttpError> {
        content_length(&self.headers)
    }
}

impl Response {
    /// The value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// The body's length from `Content-Length` (None: until the close).
    pub fn content_length(&self) -> Result<Option<u64>, HttpError> {
        content_length(&self.headers)
    }
}

/// Reads a head (through its empty line) from `r`; None if the stream
/// ended before its first byte.
pub fn read_head(r: &mut impl BufRead) -> Result<Option<Vec<u8>>, HttpError> {
    let mut head = Vec::new();
    loop {
        let room = (MAX_HEAD - head.len()) as u64;
        let n = io::Read::take(&mut *r, room)
            .read_until(b'\n', &mut head)
            .map_err(HttpError::Read)?;
        if n == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            return Err(if head.len() >= MAX_HEAD {
                HttpError::TooLong
            } else {
                HttpError::Closed
            });
        }
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" || head.ends_with(b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() >= MAX_HEAD {
            return Err(HttpError::TooLong);
        }
    }
}

fn headers_of(h: &[httparse::Header<'_>]) -> Result<Vec<(String, String)>, HttpError> {
    h.iter()
        .map(|h| {
            let v = std::str::from_utf8(h.value)
                .map_err(|_| HttpError::Malformed(format!("header {} is not UTF-8", h.name)))?;
            Ok((h.name.to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Parses a complete request head.
pub fn parse_request(head: &[u8]) -> Result<Request, HttpError> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(HttpError::Malformed("incomplete head".into()))
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    }
    if req.version != Some(1) {
        return Err(HttpError::Malformed("only HTTP/1.1 is spoken".into()));
    }
    Ok(Request {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        headers: headers_of(req.headers)?,
    })
}

/// Parses a complete response head.
pub fn parse_response(head: &[u8]) -> Result<Response, HttpError> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut hs);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(HttpError::Malformed("incomplete head".into()))
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    }
    Ok(Response {
        status: resp.code.unwrap_or_default(),
        headers: headers_of(resp.headers)?,
    })
}

/// The reason phrase of the statuses the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Status",
    }
}

/// A response head: `Content-Length: len` when `len` is given, else the
/// body runs until the connection closes (a stream of JSON lines).
pub fn response_head(status: u16, content_type: &str, len: Option<u64>) -> Vec<u8> {
    let mut h = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        reason(status)
    );
    if let Some(n) = len {
        h.push_str(&format!("Content-Length: {n}\r\n"));
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// A request head for `host` with the extra `headers` and a body of `len`
/// bytes (None: no body).
pub fn request_head(
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    len: Option<u64>,
) -> Vec<u8> {
    let mut h = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (n, v) in headers {
        h.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(n) = len {
        h.push_str(&format!("Content-Length: {n}\r\n"));
    }
    h.push_str("\r\n");
    h.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_refuse() {
        let h = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\ncontent-length: 12\r\nKimberley-Key: ab\r\n\r\n";
        let mut r = &h[..];
        let head = read_head(&mut r).unwrap().unwrap();
        let req = parse_request(&head).unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("POST", "/v1/sessions")
        );
        assert_eq!(req.header("kimberley-key"), Some("ab"));
        assert_eq!(req.content_length().unwrap(), Some(12));
        for bad in [
            &b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(parse_request(bad).unwrap().content_length().is_err());
        }
        assert!(parse_request(b"GET / HTTP/1.0\r\n\r\n").is_err());
        assert!(parse_request(b"\x16\x03\x01\x02\x00\x01\r\n\r\n").is_err());
    }

    #[test]
    fn heads_are_bounded() {
        let long = vec![b'a'; MAX_HEAD + 10];
        assert!(matches!(read_head(&mut &long[..]), Err(HttpError::TooLong)));
        assert!(matches!(
            read_head(&mut &b"GET / HTTP/1.1\r\n"[..]),
            Err(HttpError::Closed)
        ));
        assert!(read_head(&mut &b""[..]).unwrap().is_none());
    }

    #[test]
    fn responses_round_trip() {
        let h = response_head(503, "application/json", Some(5));
        let r = parse_response(&h).unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.content_length().unwrap(), Some(5));
        let q = request_head("GET", "/v1/info", "h:1", &[("A", "b")], None);
        let q = parse_request(&q).unwrap();
        assert_eq!(q.header("a"), Some("b"));
        assert_eq!(q.content_length().unwrap(), None);
    }
}
