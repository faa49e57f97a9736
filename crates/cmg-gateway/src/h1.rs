//! A small, strict HTTP/1.1 server loop for device connections.
//!
//! hyper's HTTP/1.1 server keeps a read and a write buffer (8 KiB each) for the whole life of a
//! keep-alive connection. Devices keep their connections open and idle most of the time, so
//! those buffers would be most of what a device connection costs. This loop holds no buffer
//! while a connection waits for its next request: it reads into a stack array only while the
//! socket is polled and allocates once bytes have arrived.
//!
//! It reads whole requests (the gateway forwards whole bodies anyway) and frames them strictly
//! (RFC 9112 §6): a request whose length could be read two ways is refused, not guessed at, so
//! that nothing can be smuggled past the gateway. A request that cannot be read is handed to
//! the service as a [`RequestError`] to answer, and the connection then closes.

use std::fmt::Display;
use std::future::{Future, poll_fn};
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::task::{Poll, ready};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::{Body, Bytes};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::Authority;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, timeout, timeout_at};

/// Bytes asked for per read, and the size of the stack array an idle connection reads into.
const READ_CHUNK: usize = 4096;
/// The first allocation for a body of known length. It then doubles, up to the declared length:
/// a head that declares a large body costs memory only as the body arrives.
const BODY_FIRST_ALLOC: usize = 16 * 1024;
/// Longest chunk-size line (size, extensions and CRLF).
const MAX_CHUNK_LINE: usize = 4096;
/// Chunk extensions one body may carry in all: they mean nothing to the gateway, so they are
/// only a cost.
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;
/// Response bytes gathered before they are written; a larger body frame is written as it is.
const WRITE_CHUNK: usize = 16 * 1024;
/// Room for a response head without reallocating.
const HEAD_CAPACITY: usize = 512;
/// Header slots parsed on the stack; a larger `max_headers` parses into the heap.
const STACK_HEADERS: usize = 64;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Limits for one device connection.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Request line and headers, and separately the trailers of a chunked body.
    pub max_head_bytes: usize,
    /// Header fields in one request head.
    pub max_headers: usize,
    /// Request body, after chunked decoding.
    pub max_body_bytes: usize,
    /// From the moment the connection is idle (waiting for a request) until the whole head has
    /// arrived; also how long a connection may idle.
    pub head_timeout: Duration,
    /// For the body, once the head is in.
    pub body_timeout: Duration,
    /// For the device to take the whole response: one that stops reading is dropped rather than
    /// holding the connection and the response's bytes.
    pub write_timeout: Duration,
}

/// Why a request could not be read; the service answers it, then the connection closes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("the request head is larger than allowed")]
    HeadTooLarge,
    #[error("the request body is larger than allowed")]
    BodyTooLarge,
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("the request uses a transfer coding other than chunked")]
    UnsupportedTransferCoding,
    #[error("the request has an expectation other than 100-continue")]
    ExpectationFailed,
}

impl RequestError {
    /// The status that answers this error.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            RequestError::Malformed(_) => StatusCode::BAD_REQUEST,
            RequestError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            RequestError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RequestError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            RequestError::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            RequestError::ExpectationFailed => StatusCode::EXPECTATION_FAILED,
        }
    }
}

fn malformed(why: &str) -> RequestError {
    RequestError::Malformed(why.to_owned())
}

/// Serves HTTP/1.1 requests on `io` until either side closes, one at a time and in order.
///
/// Each request, read whole, or the reason it could not be read, goes to `service`; its response
/// is written back. After a [`RequestError`] the connection closes. Keep-alive follows the
/// request (HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`).
///
/// Returns `Ok` when the connection ends normally: the peer closed it between requests, it idled
/// for `head_timeout`, `stop` turned true, or a response ended it. Returns `Err` on an I/O error,
/// when the peer closed in the middle of a request, or when a started head did not complete
/// within `head_timeout`; none of these gets a response.
///
/// `stop` closes an idle connection at once; a busy one finishes its response (saying
/// `connection: close` if its head is not yet written) and then closes.
pub(crate) async fn serve<IO, S, Fut, B>(
    mut io: IO,
    limits: &Limits,
    mut stop: watch::Receiver<bool>,
    mut service: S,
) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Result<Request<Full<Bytes>>, RequestError>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body<Data = Bytes>,
    B::Error: Display,
{
    // Bytes received and not used yet: the start of a pipelined request, if any.
    let mut buf = Vec::new();
    loop {
        let deadline = Instant::now() + limits.head_timeout;
        // A CRLF some clients send after a body does not make the connection busy.
        let blank = blank_lines(&buf);
        buf.drain(..blank);
        if buf.is_empty() {
            // Idle: the buffer of the last request goes back to the allocator, and the wait for
            // the next bytes holds none (see `read_fresh`).
            drop(std::mem::take(&mut buf));
            let first = tokio::select! {
                biased;
                () = stopped(&mut stop) => None,
                first = timeout_at(deadline, read_fresh(&mut io)) => match first {
                    Ok(first) => Some(first?),
                    Err(_) => None,
                },
            };
            match first {
                Some(bytes) if bytes.is_empty() => return Ok(()),
                Some(bytes) => buf = bytes,
                // Idle for too long, or shutting down: a clean close (TLS close_notify).
                None => return close(&mut io).await,
            }
        }
        // Boxed: a request's state (the service's future, the response body, the parsers) takes
        // memory while the request is in flight, not in every idle connection's future.
        let after = Box::pin(exchange(
            &mut io,
            &mut buf,
            limits,
            deadline,
            &stop,
            &mut service,
        ))
        .await?;
        let stopping = *stop.borrow();
        match after {
            After::KeepAlive if !stopping => {}
            After::KeepAlive | After::Close => return close(&mut io).await,
            After::Abort => return Ok(()),
        }
    }
}

/// What a connection does after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    KeepAlive,
    /// Close cleanly: the response is complete.
    Close,
    /// Drop the connection without a clean close: the response is cut short, and with a body
    /// delimited by the close, a clean close would make it look complete.
    Abort,
}

/// Closes the sending side (TLS close_notify, then FIN). A peer that already left is no error:
/// everything it asked for was written.
async fn close<IO: AsyncWrite + Unpin>(io: &mut IO) -> io::Result<()> {
    let _ = io.shutdown().await;
    Ok(())
}

/// Resolves once `stop` is true; never if its sender goes away first (nobody can stop us then).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits for the first bytes of a request and returns them in a new buffer; an empty one at
/// the end of the stream.
async fn read_fresh<IO: AsyncRead + Unpin>(io: &mut IO) -> io::Result<Vec<u8>> {
    poll_fn(|cx| {
        // The array exists only while this closure runs, so an idle connection's future holds
        // no buffer: an array held across an `.await` would live in every idle connection's
        // future. Whatever arrived is copied into a heap buffer of just its size.
        let mut scratch = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut scratch);
        ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
        Poll::Ready(Ok(read.filled().to_vec()))
    })
    .await
}

/// Reads more of the current request into `buf`.
async fn read_more<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.reserve(READ_CHUNK);
    match io.read_buf(buf).await? {
        0 => Err(cut_short()),
        _ => Ok(()),
    }
}

fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the peer closed the connection in the middle of a request",
    )
}

/// One request and its response; `buf` holds what has arrived of the request.
async fn exchange<IO, S, Fut, B>(
    io: &mut IO,
    buf: &mut Vec<u8>,
    limits: &Limits,
    deadline: Instant,
    stop: &watch::Receiver<bool>,
    service: &mut S,
) -> io::Result<After>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Result<Request<Full<Bytes>>, RequestError>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body<Data = Bytes>,
    B::Error: Display,
{
    let (mut reply, head) = match timeout_at(deadline, read_head(io, buf, limits)).await {
        Ok(head) => head?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request head did not arrive in time",
            ));
        }
    };
    let request = match head {
        Ok(head) => read_body(io, buf, limits, head).await?,
        Err(e) => Err(e),
    };
    // After a refused request, where the next one would start is unknown.
    reply.keep_alive &= request.is_ok();
    let response = service(request).await;
    reply.keep_alive &= !*stop.borrow();
    match timeout(limits.write_timeout, write_response(io, response, reply)).await {
        Ok(after) => after,
        Err(_) => {
            tracing::debug!("the device did not take its response in time; closing");
            Ok(After::Abort)
        }
    }
}

/// What the answer to a request depends on.
#[derive(Debug, Clone, Copy)]
struct Reply {
    version: Version,
    head_request: bool,
    keep_alive: bool,
}

impl Reply {
    /// For a head that could not be parsed.
    const UNKNOWN: Reply = Reply {
        version: Version::HTTP_11,
        head_request: false,
        keep_alive: false,
    };
}

/// A request head that passed every check.
#[derive(Debug)]
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    /// The client waits for `100 Continue` before it sends the body.
    expect_continue: bool,
}

/// How the request body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
}

/// Reads until `buf` starts with a whole head and takes it out of `buf`.
async fn read_head<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> io::Result<(Reply, Result<Head, RequestError>)> {
    // Empty lines before the request line are skipped (RFC 9112 §2.2) but count as head bytes.
    let mut blank = 0;
    // How much of `buf` has been looked at for a line end.
    let mut seen: usize = 0;
    loop {
        let skip = blank_lines(buf);
        if skip > 0 {
            buf.drain(..skip);
            blank += skip;
            seen = seen.saturating_sub(skip);
        }
        // Parsed only when a line is complete, so a head that arrives a byte at a time is parsed
        // once per line (at most `max_headers` + 2 times), not once per byte.
        if buf.get(seen..).is_some_and(|new| new.contains(&b'\n'))
            && let Some((used, reply, head)) = parse_head(buf, blank, limits)
        {
            buf.drain(..used.min(buf.len()));
            return Ok((reply, head));
        }
        if blank + buf.len() >= limits.max_head_bytes {
            return Ok((Reply::UNKNOWN, Err(RequestError::HeadTooLarge)));
        }
        seen = buf.len();
        read_more(io, buf).await?;
    }
}

/// Length of the empty lines at the start of `buf`.
fn blank_lines(buf: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match buf.get(at..) {
            Some([b'\n', ..]) => at += 1,
            Some([b'\r', b'\n', ..]) => at += 2,
            _ => return at,
        }
    }
}

/// Parses the head at the start of `buf`: `None` while it is incomplete, else the bytes it
/// took, how to answer, and the head or why it is refused.
fn parse_head(
    buf: &[u8],
    blank: usize,
    limits: &Limits,
) -> Option<(usize, Reply, Result<Head, RequestError>)> {
    let mut on_stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut on_heap: Vec<httparse::Header<'_>>;
    let slots = match on_stack.get_mut(..limits.max_headers) {
        Some(slots) => slots,
        None => {
            on_heap = vec![httparse::EMPTY_HEADER; limits.max_headers];
            &mut on_heap[..]
        }
    };
    let mut request = httparse::Request::new(slots);
    let refused = |e| Some((0, Reply::UNKNOWN, Err(e)));
    let used = match request.parse(buf) {
        Ok(httparse::Status::Partial) => return None,
        Ok(httparse::Status::Complete(used)) => used,
        Err(httparse::Error::TooManyHeaders) => return refused(RequestError::HeadTooLarge),
        Err(e) => return refused(RequestError::Malformed(e.to_string())),
    };
    if blank + used > limits.max_head_bytes {
        return refused(RequestError::HeadTooLarge);
    }
    let (reply, head) = check_head(&request, limits);
    Some((used, reply, head))
}

/// Turns a parsed head into a [`Head`], refusing what RFC 9112 forbids or the gateway does not do.
fn check_head(
    request: &httparse::Request<'_, '_>,
    limits: &Limits,
) -> (Reply, Result<Head, RequestError>) {
    let version = match request.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut reply = Reply {
        version,
        ..Reply::UNKNOWN
    };
    let Ok(method) = Method::from_bytes(request.method.unwrap_or_default().as_bytes()) else {
        return (reply, Err(malformed("invalid method")));
    };
    reply.head_request = method == Method::HEAD;
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    for field in request.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return (reply, Err(malformed("invalid header field")));
        };
        headers.append(name, value);
    }
    reply.keep_alive = wants_keep_alive(version, &headers);
    let head = request_target(request.path.unwrap_or_default()).and_then(|uri| {
        check_host(version, &headers)?;
        let framing = framing(version, &headers, limits)?;
        let expect_continue = expects_continue(version, &headers)?;
        Ok(Head {
            method,
            uri,
            version,
            headers,
            framing,
            expect_continue,
        })
    });
    (reply, head)
}

/// Origin form (`/p?q`) or absolute form (`https://h/p`); the authority form is for CONNECT and
/// the asterisk form for `OPTIONS *`, neither of which a gateway serves (RFC 9112 §3.2).
fn request_target(target: &str) -> Result<Uri, RequestError> {
    let refused = || malformed("the request target is neither a path nor an absolute URL");
    let uri = Uri::try_from(target).map_err(|_| refused())?;
    let absolute = matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some();
    if target.starts_with('/') || absolute {
        Ok(uri)
    } else {
        Err(refused())
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host, and it is valid.
fn check_host(version: Version, headers: &HeaderMap) -> Result<(), RequestError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => Err(malformed("more than one Host")),
        (None, _) if version == Version::HTTP_11 => Err(malformed("no Host")),
        (Some(host), _) if !host.is_empty() && Authority::try_from(host.as_bytes()).is_err() => {
            Err(malformed("invalid Host"))
        }
        _ => Ok(()),
    }
}

/// The body's framing (RFC 9112 §6). Anything that could be read two ways is refused: a proxy in
/// front of the gateway might have read it the other way.
fn framing(
    version: Version,
    headers: &HeaderMap,
    limits: &Limits,
) -> Result<Framing, RequestError> {
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(coding) = codings.next() {
        if version == Version::HTTP_10 {
            return Err(malformed("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if lengths.next().is_some() {
            return Err(malformed("both Transfer-Encoding and Content-Length"));
        }
        if codings.next().is_some() || !coding.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(RequestError::UnsupportedTransferCoding);
        }
        return Ok(Framing::Chunked);
    }
    let Some(length) = lengths.next() else {
        return Ok(Framing::Empty);
    };
    // Identical duplicates are refused too: there is no reason to send them.
    if lengths.next().is_some() {
        return Err(malformed("more than one Content-Length"));
    }
    let digits = length.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(malformed("Content-Length is not a decimal number"));
    }
    let length = digits.iter().fold(0usize, |n, digit| {
        n.saturating_mul(10)
            .saturating_add(usize::from(digit - b'0'))
    });
    if length > limits.max_body_bytes {
        return Err(RequestError::BodyTooLarge);
    }
    Ok(match length {
        0 => Framing::Empty,
        length => Framing::Length(length),
    })
}

/// Whether the client waits for `100 Continue`. `100-continue` is the only expectation there
/// is; an HTTP/1.0 client cannot take a 1xx response, so there it is ignored (RFC 9110 §10.1.1).
fn expects_continue(version: Version, headers: &HeaderMap) -> Result<bool, RequestError> {
    let mut expect = headers.get_all(header::EXPECT).iter();
    let Some(first) = expect.next() else {
        return Ok(false);
    };
    if expect.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"100-continue") {
        return Err(RequestError::ExpectationFailed);
    }
    Ok(version == Version::HTTP_11)
}

fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let (mut close, mut keep_alive) = (false, false);
    for value in headers.get_all(header::CONNECTION) {
        for option in value.as_bytes().split(|b| *b == b',') {
            let option = option.trim_ascii();
            close |= option.eq_ignore_ascii_case(b"close");
            keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    !close && (version == Version::HTTP_11 || keep_alive)
}

/// Reads the body `head` announces, within `body_timeout`, and makes the request.
async fn read_body<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    buf: &mut Vec<u8>,
    limits: &Limits,
    head: Head,
) -> io::Result<Result<Request<Full<Bytes>>, RequestError>> {
    let body = match head.framing {
        Framing::Empty => Bytes::new(),
        framing => {
            let deadline = Instant::now() + limits.body_timeout;
            let read = read_framed(io, buf, limits, framing, head.expect_continue);
            match timeout_at(deadline, read).await {
                Ok(body) => match body? {
                    Ok(body) => body,
                    Err(e) => return Ok(Err(e)),
                },
                Err(_) => return Ok(Err(RequestError::BodyTimeout)),
            }
        }
    };
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = head.method;
    *request.uri_mut() = head.uri;
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers;
    Ok(Ok(request))
}

async fn read_framed<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    buf: &mut Vec<u8>,
    limits: &Limits,
    framing: Framing,
    expect_continue: bool,
) -> io::Result<Result<Bytes, RequestError>> {
    // A client that already sent some of the body did not wait for it.
    if expect_continue && buf.is_empty() {
        io.write_all(CONTINUE).await?;
        io.flush().await?;
    }
    match framing {
        Framing::Empty => Ok(Ok(Bytes::new())),
        Framing::Length(length) => {
            while buf.len() < length {
                let target = length.min(buf.len().saturating_mul(2).max(BODY_FIRST_ALLOC));
                buf.reserve_exact(target.saturating_sub(buf.len()));
                if io.read_buf(buf).await? == 0 {
                    return Err(cut_short());
                }
            }
            // What follows the body (a pipelined request) stays in `buf`.
            let rest = buf.split_off(length);
            Ok(Ok(Bytes::from(std::mem::replace(buf, rest))))
        }
        Framing::Chunked => {
            let mut decoder = Chunked::default();
            let mut body = Vec::new();
            loop {
                match decoder.decode(buf, &mut body, limits) {
                    Ok(used) => {
                        buf.drain(..used.min(buf.len()));
                    }
                    Err(e) => return Ok(Err(e)),
                }
                if decoder.state == ChunkState::Done {
                    return Ok(Ok(Bytes::from(body)));
                }
                read_more(io, buf).await?;
            }
        }
    }
}

/// A chunked body decoder (RFC 9112 §7.1) that takes its input as it arrives.
#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    /// Chunk extension bytes so far.
    extensions: usize,
    /// Trailer section bytes so far.
    trailers: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Bytes left in the current chunk.
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

impl Chunked {
    /// Decodes what it can of `input` into `body`; returns how many bytes of `input` it used.
    fn decode(
        &mut self,
        input: &[u8],
        body: &mut Vec<u8>,
        limits: &Limits,
    ) -> Result<usize, RequestError> {
        let mut used = 0;
        loop {
            let rest = input.get(used..).unwrap_or_default();
            match self.state {
                ChunkState::Size => {
                    let line = take_line(rest, MAX_CHUNK_LINE).map_err(|e| match e {
                        LineError::TooLong => malformed("a chunk-size line is too long"),
                        LineError::NoCr => malformed("a chunk-size line does not end with CRLF"),
                    })?;
                    let Some((line, len)) = line else {
                        return Ok(used);
                    };
                    let size = chunk_size(line, &mut self.extensions)?;
                    used += len;
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else if size > limits.max_body_bytes.saturating_sub(body.len()) {
                        return Err(RequestError::BodyTooLarge);
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if rest.is_empty() {
                        return Ok(used);
                    }
                    let take = left.min(rest.len());
                    body.extend_from_slice(rest.get(..take).unwrap_or_default());
                    used += take;
                    self.state = match left - take {
                        0 => ChunkState::DataEnd,
                        left => ChunkState::Data(left),
                    };
                }
                ChunkState::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        used += 2;
                        self.state = ChunkState::Size;
                    }
                    [] | [b'\r'] => return Ok(used),
                    _ => return Err(malformed("a chunk's data is not followed by CRLF")),
                },
                ChunkState::Trailers => {
                    let room = limits.max_head_bytes.saturating_sub(self.trailers);
                    let line = take_line(rest, room).map_err(|e| match e {
                        LineError::TooLong => RequestError::HeadTooLarge,
                        LineError::NoCr => malformed("a trailer line does not end with CRLF"),
                    })?;
                    let Some((line, len)) = line else {
                        return Ok(used);
                    };
                    self.trailers += len;
                    used += len;
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    } else if !is_field_line(line) {
                        return Err(malformed("invalid trailer field"));
                    }
                }
                ChunkState::Done => return Ok(used),
            }
        }
    }
}

enum LineError {
    TooLong,
    NoCr,
}

/// The line at the start of `input` without its CRLF, and its length with it; `None` while the
/// line is incomplete. Lines (CRLF included) longer than `max` are refused.
fn take_line(input: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, LineError> {
    match input.iter().take(max).position(|b| *b == b'\n') {
        Some(lf) => {
            let line = input.get(..lf).unwrap_or_default();
            match line.strip_suffix(b"\r") {
                Some(line) => Ok(Some((line, lf + 1))),
                None => Err(LineError::NoCr),
            }
        }
        None if !input.is_empty() && input.len() >= max => Err(LineError::TooLong),
        None => Ok(None),
    }
}

/// `chunk-size [ chunk-ext ]`: the size, with an overflow check; extensions are ignored.
fn chunk_size(line: &[u8], extensions: &mut usize) -> Result<usize, RequestError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let (hex, rest) = line.split_at_checked(digits).unwrap_or((line, &[]));
    if hex.is_empty() {
        return Err(malformed("a chunk size is missing"));
    }
    let mut size = 0usize;
    for digit in hex {
        size = char::from(*digit)
            .to_digit(16)
            .and_then(|digit| size.checked_mul(16)?.checked_add(digit as usize))
            .ok_or_else(|| malformed("a chunk size is too large"))?;
    }
    if !rest.is_empty() {
        // BWS ";" ...: parameters the gateway has no use for, checked only for bytes that have
        // no place in a line.
        let bws = rest
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        let extension = rest.get(bws..).unwrap_or_default();
        if extension.first() != Some(&b';') || !extension.iter().all(|b| is_field_byte(*b)) {
            return Err(malformed(
                "a chunk size is followed by something other than an extension",
            ));
        }
        *extensions += rest.len();
        if *extensions > MAX_CHUNK_EXTENSIONS {
            return Err(malformed("the chunk extensions are too long"));
        }
    }
    Ok(size)
}

/// `field-name ":" field-value`, as far as a trailer that is dropped needs checking.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return false;
    };
    let (name, value) = line.split_at(colon);
    !name.is_empty() && name.iter().all(|b| is_tchar(*b)) && value.iter().all(|b| is_field_byte(*b))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// HTAB, SP, visible ASCII or obs-text: what a field value or chunk extension may hold.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (b >= b' ' && b != 0x7f)
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    Nothing,
    Length(u64),
    Chunked,
    /// HTTP/1.0 with a body of unknown length: the close ends it.
    UntilClose,
}

/// A single Content-Length the service set that is a plain decimal number.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let length = lengths.next()?;
    if lengths.next().is_some() {
        return None;
    }
    let digits = length.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

async fn write_response<IO, B>(
    io: &mut IO,
    response: Response<B>,
    mut reply: Reply,
) -> io::Result<After>
where
    IO: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: Display,
{
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let hint = body.size_hint().exact();
    let declared = declared_length(&parts.headers);
    let (out, content_length) = if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        (Out::Nothing, None)
    } else if reply.head_request {
        // No body, but the length it would have had. The service's own word comes first: a
        // relayed answer to HEAD carries the representation's length over an empty body.
        (Out::Nothing, declared.or(hint))
    } else if let Some(length) = hint.or(declared) {
        // The service's Content-Length is used only when the body cannot tell its size (a
        // mapped body loses its size hint); the bytes written are held to it either way.
        (Out::Length(length), Some(length))
    } else if reply.version == Version::HTTP_11 {
        (Out::Chunked, None)
    } else {
        reply.keep_alive = false;
        (Out::UntilClose, None)
    };

    let mut head = Vec::with_capacity(HEAD_CAPACITY);
    head.extend_from_slice(if reply.version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or_default().as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        // Framing and connection management are this loop's.
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        push_field(&mut head, name.as_str(), value.as_bytes());
    }
    if !parts.headers.contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        push_display(&mut head, httpdate::HttpDate::from(SystemTime::now()));
        head.extend_from_slice(b"\r\n");
    }
    if !reply.keep_alive {
        head.extend_from_slice(b"connection: close\r\n");
    } else if reply.version == Version::HTTP_10 {
        head.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if let Some(length) = content_length {
        head.extend_from_slice(b"content-length: ");
        push_display(&mut head, length);
        head.extend_from_slice(b"\r\n");
    }
    if out == Out::Chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    head.extend_from_slice(b"\r\n");

    let complete = match out {
        Out::Nothing => {
            drop(body);
            io.write_all(&head).await?;
            io.flush().await?;
            true
        }
        _ => send_body(io, pin!(body), out, head).await?,
    };
    Ok(match (complete, reply.keep_alive) {
        (false, _) => After::Abort,
        (true, true) => After::KeepAlive,
        (true, false) => After::Close,
    })
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn push_display(out: &mut Vec<u8>, value: impl Display) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{value}");
}

/// Writes `out` (the head) and the body after it; `false` if the body failed or broke its
/// announced length, so that the response is cut short (what was ready is still written).
async fn send_body<IO, B>(
    io: &mut IO,
    mut body: Pin<&mut B>,
    framing: Out,
    mut out: Vec<u8>,
) -> io::Result<bool>
where
    IO: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: Display,
{
    // What the body still owes when its length was announced.
    let mut owed = match framing {
        Out::Length(length) => Some(length),
        _ => None,
    };
    let complete = loop {
        // Frames that are ready now join the bytes waiting in `out`, which go out when the body
        // makes us wait: a small response is one write (one TLS record), and a slow stream is
        // not held back.
        let frame = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    io.write_all(&out).await?;
                    out.clear();
                }
                io.flush().await?;
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        let data = match frame {
            None if owed.is_some_and(|owed| owed > 0) => {
                tracing::debug!("the response body is shorter than its announced length");
                break false;
            }
            None => break true,
            Some(Err(e)) => {
                tracing::debug!("the response body failed: {e}; closing the connection");
                break false;
            }
            // Trailers are not sent: nobody asked for them with `TE: trailers`.
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        if let Some(owed) = owed.as_mut() {
            match owed.checked_sub(data.len() as u64) {
                Some(left) => *owed = left,
                None => {
                    tracing::debug!("the response body is longer than its announced length");
                    break false;
                }
            }
        }
        if framing == Out::Chunked {
            push_display(&mut out, format_args!("{:x}\r\n", data.len()));
        }
        if data.len() > WRITE_CHUNK {
            io.write_all(&out).await?;
            out.clear();
            io.write_all(&data).await?;
        } else {
            out.extend_from_slice(&data);
        }
        if framing == Out::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= WRITE_CHUNK {
            io.write_all(&out).await?;
            out.clear();
        }
    };
    if complete && framing == Out::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    io.write_all(&out).await?;
    io.flush().await?;
    Ok(complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use hyper::body::Frame;
    use tokio::io::DuplexStream;
    use tokio::sync::{Notify, mpsc};
    use tokio::task::JoinHandle;

    /// Longer than every server time-out, so that with the clock paused the server's fire first.
    const PATIENCE: Duration = Duration::from_secs(60);

    fn limits() -> Limits {
        Limits {
            max_head_bytes: 1024,
            max_headers: 16,
            max_body_bytes: 1024,
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }

    type Incoming = Result<Request<Full<Bytes>>, RequestError>;
    /// What the service was given: the request with its body, or the error's variant.
    type Log = Arc<Mutex<Vec<Result<Request<Bytes>, String>>>>;
    type Answer<B> = Pin<Box<dyn Future<Output = Response<B>> + Send>>;

    /// A request as (method, URI, body), or the error's variant.
    type Given = Result<(String, String, Vec<u8>), String>;

    fn seen(log: &Log) -> Vec<Given> {
        log.lock()
            .unwrap()
            .iter()
            .map(|r| match r {
                Ok(request) => Ok((
                    request.method().to_string(),
                    request.uri().to_string(),
                    request.body().to_vec(),
                )),
                Err(e) => Err(e.clone()),
            })
            .collect()
    }

    async fn record(log: &Log, request: Incoming) -> Result<Request<Bytes>, RequestError> {
        match request {
            Ok(request) => {
                let (parts, body) = request.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let request = Request::from_parts(parts, body);
                let copy = Request::builder()
                    .method(request.method().clone())
                    .uri(request.uri().clone())
                    .version(request.version())
                    .body(request.body().clone())
                    .unwrap();
                log.lock().unwrap().push(Ok(copy));
                Ok(request)
            }
            Err(e) => {
                log.lock().unwrap().push(Err(format!("{e:?}")));
                Err(e)
            }
        }
    }

    /// Answers `METHOD URI\n` followed by the request body; an error with its status.
    fn echo(log: Log) -> impl FnMut(Incoming) -> Answer<Full<Bytes>> + Send + 'static {
        move |request| {
            let log = Arc::clone(&log);
            Box::pin(async move {
                match record(&log, request).await {
                    Ok(request) => {
                        let mut text =
                            format!("{} {}\n", request.method(), request.uri()).into_bytes();
                        text.extend_from_slice(request.body());
                        Response::new(Full::new(Bytes::from(text)))
                    }
                    Err(e) => {
                        let mut response = Response::new(Full::new(Bytes::from(e.to_string())));
                        *response.status_mut() = e.status();
                        response
                    }
                }
            })
        }
    }

    struct Conn {
        client: DuplexStream,
        read: Vec<u8>,
        stop: watch::Sender<bool>,
        server: JoinHandle<io::Result<()>>,
    }

    fn start_on<IO, S, Fut, B>(
        server_io: IO,
        client: DuplexStream,
        limits: Limits,
        service: S,
    ) -> Conn
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: FnMut(Incoming) -> Fut + Send + 'static,
        Fut: Future<Output = Response<B>> + Send,
        B: Body<Data = Bytes> + Send,
        B::Error: Display + Send,
    {
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(async move { serve(server_io, &limits, stopped, service).await });
        Conn {
            client,
            read: Vec::new(),
            stop,
            server,
        }
    }

    fn start<S, Fut, B>(limits: Limits, service: S) -> Conn
    where
        S: FnMut(Incoming) -> Fut + Send + 'static,
        Fut: Future<Output = Response<B>> + Send,
        B: Body<Data = Bytes> + Send,
        B::Error: Display + Send,
    {
        let (client, server) = tokio::io::duplex(64 * 1024);
        start_on(server, client, limits, service)
    }

    fn start_echo() -> (Conn, Log) {
        let log = Log::default();
        (start(limits(), echo(Arc::clone(&log))), log)
    }

    #[derive(Debug)]
    struct Resp {
        version: u8,
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            let mut values = self.headers.iter().filter(|(n, _)| n == name);
            let value = values.next().map(|(_, v)| v.as_str());
            assert!(values.next().is_none(), "{name} twice in {self:?}");
            value
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }

    impl Conn {
        async fn send(&mut self, bytes: impl AsRef<[u8]>) {
            self.client.write_all(bytes.as_ref()).await.unwrap();
        }

        /// Reads more from the server; `false` at the end of the stream.
        async fn fill(&mut self) -> bool {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(PATIENCE, self.client.read(&mut chunk))
                .await
                .expect("the server neither answered nor closed")
                .unwrap();
            self.read.extend_from_slice(&chunk[..n]);
            n > 0
        }

        async fn need(&mut self, n: usize) {
            while self.read.len() < n {
                assert!(self.fill().await, "the connection closed in a response");
            }
        }

        async fn line(&mut self) -> String {
            loop {
                if let Some(at) = self.read.windows(2).position(|w| w == b"\r\n") {
                    let line = String::from_utf8(self.read[..at].to_vec()).unwrap();
                    self.read.drain(..at + 2);
                    return line;
                }
                assert!(self.fill().await, "the connection closed in a chunk line");
            }
        }

        async fn response(&mut self) -> Resp {
            self.response_to(false).await
        }

        /// Reads one response; `head_request`: it answers HEAD, so it has no body.
        async fn response_to(&mut self, head_request: bool) -> Resp {
            loop {
                let mut slots = [httparse::EMPTY_HEADER; 32];
                let mut parsed = httparse::Response::new(&mut slots);
                let status = parsed
                    .parse(&self.read)
                    .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.read)));
                if let httparse::Status::Complete(used) = status {
                    let mut response = Resp {
                        version: parsed.version.unwrap(),
                        status: parsed.code.unwrap(),
                        headers: parsed
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_ascii_lowercase(),
                                    String::from_utf8(h.value.to_vec()).unwrap(),
                                )
                            })
                            .collect(),
                        body: Vec::new(),
                    };
                    self.read.drain(..used);
                    let status = response.status;
                    if head_request || status < 200 || status == 204 || status == 304 {
                        return response;
                    }
                    if response.header("transfer-encoding") == Some("chunked") {
                        assert_eq!(response.header("content-length"), None);
                        response.body = self.chunked().await;
                    } else if let Some(length) = response.header("content-length") {
                        let length: usize = length.parse().unwrap();
                        self.need(length).await;
                        response.body = self.read.drain(..length).collect();
                    } else {
                        while self.fill().await {}
                        response.body = std::mem::take(&mut self.read);
                    }
                    return response;
                }
                assert!(
                    self.fill().await,
                    "the connection closed before a response head: {:?}",
                    String::from_utf8_lossy(&self.read)
                );
            }
        }

        async fn chunked(&mut self) -> Vec<u8> {
            let mut body = Vec::new();
            loop {
                let size = usize::from_str_radix(&self.line().await, 16).unwrap();
                if size == 0 {
                    assert_eq!(self.line().await, "", "no trailers, then CRLF");
                    return body;
                }
                self.need(size + 2).await;
                body.extend(self.read.drain(..size));
                assert_eq!(self.read.drain(..2).collect::<Vec<_>>(), b"\r\n");
            }
        }

        /// Whether the server closed the connection with nothing more sent.
        async fn closed(&mut self) -> bool {
            !self.fill().await && self.read.is_empty()
        }

        /// Everything the server sends until it closes.
        async fn rest(&mut self) -> String {
            while self.fill().await {}
            String::from_utf8_lossy(&std::mem::take(&mut self.read)).into_owned()
        }

        async fn result(self) -> io::Result<()> {
            tokio::time::timeout(PATIENCE, self.server)
                .await
                .expect("the server did not end")
                .unwrap()
        }
    }

    /// A body of unknown length fed through a channel.
    struct Streamed(mpsc::Receiver<Result<Bytes, String>>);

    impl Body for Streamed {
        type Data = Bytes;
        type Error = String;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
            self.0
                .poll_recv(cx)
                .map(|item| item.map(|r| r.map(Frame::data)))
        }
    }

    /// Answers every request with the body the test feeds.
    fn streaming(
        bodies: Arc<Mutex<Vec<Streamed>>>,
        content_length: Option<&'static str>,
    ) -> impl FnMut(Incoming) -> Answer<Streamed> + Send + 'static {
        move |_request| {
            let body = bodies.lock().unwrap().remove(0);
            Box::pin(async move {
                let mut response = Response::new(body);
                if let Some(length) = content_length {
                    response
                        .headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from_static(length));
                }
                response
            })
        }
    }

    const GET_A: &str = "GET /a HTTP/1.1\r\nHost: cmg.example\r\n\r\n";
    const GET_B: &str = "GET /b?q=1 HTTP/1.1\r\nHost: cmg.example\r\n\r\n";

    #[tokio::test]
    async fn two_keep_alive_gets_share_a_connection() {
        let (mut conn, log) = start_echo();
        conn.send(GET_A).await;
        let first = conn.response().await;
        assert_eq!((first.version, first.status), (1, 200));
        assert_eq!(first.text(), "GET /a\n");
        assert_eq!(first.header("content-length"), Some("7"));
        assert_eq!(first.header("connection"), None);
        assert!(first.header("date").is_some_and(|d| d.ends_with(" GMT")));
        conn.send(GET_B).await;
        assert_eq!(conn.response().await.text(), "GET /b?q=1\n");
        assert_eq!(seen(&log).len(), 2);
        conn.client.shutdown().await.unwrap();
        assert!(conn.closed().await);
        conn.result().await.unwrap();
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let (mut conn, log) = start_echo();
        conn.send(format!(
            "{GET_A}POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello{GET_B}"
        ))
        .await;
        assert_eq!(conn.response().await.text(), "GET /a\n");
        assert_eq!(conn.response().await.text(), "POST /p\nhello");
        assert_eq!(conn.response().await.text(), "GET /b?q=1\n");
        assert_eq!(seen(&log).len(), 3);
    }

    #[tokio::test]
    async fn a_content_length_body_reaches_the_service_intact() {
        let (mut conn, log) = start_echo();
        let body: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
        conn.send(format!(
            "POST /upload HTTP/1.1\r\nHost: h\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        ))
        .await;
        conn.send(&body).await;
        let response = conn.response().await;
        assert_eq!(&response.body[b"POST /upload\n".len()..], &body[..]);
        let seen = seen(&log);
        assert_eq!(seen[0].as_ref().unwrap().2, body);
        let log = log.lock().unwrap();
        let request = log[0].as_ref().unwrap();
        assert_eq!(request.version(), Version::HTTP_11);
    }

    #[tokio::test]
    async fn a_chunked_body_with_extensions_and_trailers_is_decoded() {
        let (mut conn, log) = start_echo();
        conn.send(format!(
            "POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n\
             5;name=value\r\nhello\r\n\
             1A ; a=b; c=\"d e\"\r\nabcdefghijklmnopqrstuvwxyz\r\n\
             0;last\r\nX-Trailer: 1\r\nX-Other: two words\r\n\r\n{GET_A}"
        ))
        .await;
        assert_eq!(
            conn.response().await.text(),
            "POST /c\nhelloabcdefghijklmnopqrstuvwxyz"
        );
        assert_eq!(conn.response().await.text(), "GET /a\n");
        assert_eq!(
            seen(&log)[0].as_ref().unwrap().2,
            b"helloabcdefghijklmnopqrstuvwxyz"
        );
    }

    /// Sends `request` on a new connection; the answer must be `status` and the connection must
    /// then close.
    async fn refused(request: &[u8], status: u16) -> Vec<Given> {
        let (mut conn, log) = start_echo();
        conn.send(request).await;
        let response = conn.response().await;
        assert_eq!(
            response.status,
            status,
            "{:?}: {}",
            String::from_utf8_lossy(request),
            response.text()
        );
        assert_eq!(response.header("connection"), Some("close"));
        assert!(
            conn.closed().await,
            "{:?}",
            String::from_utf8_lossy(request)
        );
        conn.result().await.unwrap();
        seen(&log)
    }

    /// Thousands of damaged requests (bytes flipped, inserted, dropped, cut short): the loop never
    /// panics, every connection ends, and every answer it gives is one well-formed response head
    /// per request it accepted. Deterministic (a fixed xorshift seed), so a failure replays.
    #[tokio::test(start_paused = true)]
    async fn damaged_requests_never_panic_and_every_connection_ends() {
        const SEEDS: [&[u8]; 4] = [
            b"GET /a?q=1 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer x.y.z\r\n\r\n",
            b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
            b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
              3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n",
            b"GET /d HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n\r\n",
        ];
        const ALPHABET: &[u8] = b"\r\n :;0123456789abcdefABCDEF/-,\t\x00\x7fHTP.";
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |below: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % below as u64) as usize
        };
        for round in 0..3000 {
            let mut input = SEEDS[next(SEEDS.len())].to_vec();
            // Sometimes two requests, pipelined.
            if next(4) == 0 {
                input.extend_from_slice(SEEDS[next(SEEDS.len())]);
            }
            for _ in 0..=next(4) {
                let at = next(input.len() + 1);
                match next(4) {
                    0 if at < input.len() => input[at] = ALPHABET[next(ALPHABET.len())],
                    1 => input.insert(at, ALPHABET[next(ALPHABET.len())]),
                    2 if at < input.len() => {
                        input.remove(at);
                    }
                    _ => input.truncate(at),
                }
            }
            let (mut conn, _) = start_echo();
            conn.send(&input).await;
            conn.client.shutdown().await.unwrap();
            let out = conn.rest().await;
            let ended = tokio::time::timeout(PATIENCE, conn.server).await;
            let ended = ended.unwrap_or_else(|_| panic!("round {round}: {input:?} never ended"));
            assert!(ended.is_ok(), "round {round}: {input:?} panicked");
            // Whatever was answered parses as whole responses, one after the other.
            if let Err(e) = crate::fuzzing::responses(out.as_bytes()) {
                panic!("round {round}: {input:?} got {out:?}: {e}");
            }
        }
    }

    #[tokio::test]
    async fn transfer_encoding_with_content_length_is_400_and_closes() {
        let seen = refused(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n\
              0\r\n\r\n",
            400,
        )
        .await;
        assert!(seen[0].as_ref().unwrap_err().starts_with("Malformed"));
    }

    #[tokio::test]
    async fn conflicting_content_lengths_are_400() {
        refused(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            400,
        )
        .await;
    }

    #[tokio::test]
    async fn a_transfer_coding_other_than_chunked_is_501() {
        let seen = refused(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
        )
        .await;
        assert_eq!(seen, [Err("UnsupportedTransferCoding".to_owned())]);
    }

    #[tokio::test]
    async fn a_declared_body_over_the_limit_is_413_without_reading_it() {
        // No body is sent: a server that tried to read it would never answer.
        let seen = refused(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1025\r\n\r\n",
            413,
        )
        .await;
        assert_eq!(seen, [Err("BodyTooLarge".to_owned())]);

        // With `Expect: 100-continue` the client is not invited to send it.
        let (mut conn, _) = start_echo();
        conn.send("PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\nExpect: 100-continue\r\n\r\n")
            .await;
        let all = conn.rest().await;
        assert!(
            all.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "{all}"
        );
        assert!(!all.contains("100 Continue"), "{all}");
    }

    #[tokio::test]
    async fn a_chunked_body_over_the_limit_is_413() {
        // 512 + 512 fit the limit of 1024; the third chunk does not, and is refused on its
        // size line before its data.
        let chunk = format!("200\r\n{}\r\n", "x".repeat(512));
        let request = format!(
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}1\r\n"
        );
        let seen = refused(request.as_bytes(), 413).await;
        assert_eq!(seen, [Err("BodyTooLarge".to_owned())]);
    }

    #[tokio::test]
    async fn expect_100_continue_gets_100_before_the_body() {
        let (mut conn, log) = start_echo();
        conn.send(
            "POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 5\r\n\r\n",
        )
        .await;
        let interim = conn.response().await;
        assert_eq!((interim.version, interim.status), (1, 100));
        assert!(interim.headers.is_empty());
        assert!(seen(&log).is_empty());
        conn.send("hello").await;
        let response = conn.response().await;
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, "POST /e\nhello")
        );
    }

    #[tokio::test]
    async fn another_expectation_is_417() {
        let seen = refused(
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 200-ok\r\nContent-Length: 5\r\n\r\nhello",
            417,
        )
        .await;
        assert_eq!(seen, [Err("ExpectationFailed".to_owned())]);
    }

    #[tokio::test]
    async fn http_1_0_is_answered_in_1_0_and_closed_unless_kept_alive() {
        let (mut conn, _) = start_echo();
        conn.send("GET /old HTTP/1.0\r\n\r\n").await;
        let response = conn.response().await;
        assert_eq!((response.version, response.status), (0, 200));
        assert_eq!(response.header("connection"), Some("close"));
        assert_eq!(response.text(), "GET /old\n");
        assert!(conn.closed().await);
        conn.result().await.unwrap();

        let (mut conn, _) = start_echo();
        for path in ["/one", "/two"] {
            conn.send(format!(
                "GET {path} HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
            ))
            .await;
            let response = conn.response().await;
            assert_eq!(response.version, 0);
            assert_eq!(response.header("connection"), Some("keep-alive"));
            assert_eq!(response.text(), format!("GET {path}\n"));
        }
    }

    #[tokio::test]
    async fn connection_close_closes_after_the_response() {
        let (mut conn, _) = start_echo();
        conn.send(format!(
            "GET /bye HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n{GET_A}"
        ))
        .await;
        let response = conn.response().await;
        assert_eq!(response.header("connection"), Some("close"));
        assert_eq!(response.text(), "GET /bye\n");
        assert!(conn.closed().await, "the pipelined request is not answered");
        conn.result().await.unwrap();
    }

    #[tokio::test]
    async fn head_gets_the_length_but_no_body() {
        let (mut conn, _) = start_echo();
        conn.send(format!("HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n{GET_A}"))
            .await;
        let head = conn.response_to(true).await;
        assert_eq!(head.status, 200);
        assert_eq!(
            head.header("content-length"),
            Some("8"),
            "len of \"HEAD /h\\n\""
        );
        // Had any body bytes been sent, they would be taken for the next response's head.
        assert_eq!(conn.response().await.text(), "GET /a\n");
    }

    #[tokio::test]
    async fn no_content_has_no_body() {
        let service = |_request: Incoming| async {
            let mut response = Response::new(Full::new(Bytes::from_static(b"not sent")));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        };
        let mut conn = start(limits(), service);
        conn.send(format!("{GET_A}{GET_A}")).await;
        for _ in 0..2 {
            let response = conn.response().await;
            assert_eq!(response.status, 204);
            assert_eq!(response.header("content-length"), None);
            assert_eq!(response.header("transfer-encoding"), None);
        }
        conn.client.shutdown().await.unwrap();
        assert!(conn.closed().await, "no stray body bytes");
    }

    #[tokio::test]
    async fn a_streamed_body_of_unknown_size_is_sent_chunked() {
        let (feed, body) = mpsc::channel(4);
        let (feed_2, body_2) = mpsc::channel(4);
        let bodies = Arc::new(Mutex::new(vec![Streamed(body), Streamed(body_2)]));
        let mut conn = start(limits(), streaming(bodies, None));
        conn.send(GET_A).await;
        tokio::spawn(async move {
            for part in ["ab", "", "cde"] {
                tokio::time::sleep(Duration::from_millis(5)).await;
                feed.send(Ok(Bytes::from(part))).await.unwrap();
            }
        });
        let response = conn.response().await;
        assert_eq!(response.header("transfer-encoding"), Some("chunked"));
        assert_eq!(response.text(), "abcde");

        // Over HTTP/1.0 the close ends the body.
        conn.send("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        feed_2.send(Ok(Bytes::from("12345"))).await.unwrap();
        drop(feed_2);
        let response = conn.response().await;
        assert_eq!(response.version, 0);
        assert_eq!(response.header("transfer-encoding"), None);
        assert_eq!(response.header("connection"), Some("close"));
        assert_eq!(response.text(), "12345");
        conn.result().await.unwrap();
    }

    #[tokio::test]
    async fn a_failing_body_ends_the_connection_without_the_last_chunk() {
        let (feed, body) = mpsc::channel(4);
        let bodies = Arc::new(Mutex::new(vec![Streamed(body)]));
        let mut conn = start(limits(), streaming(bodies, None));
        conn.send(GET_A).await;
        feed.send(Ok(Bytes::from("ab"))).await.unwrap();
        feed.send(Err("upstream reset".into())).await.unwrap();
        let all = conn.rest().await;
        assert!(all.ends_with("\r\n\r\n2\r\nab\r\n"), "{all:?}");
        conn.result().await.unwrap();
    }

    #[tokio::test]
    async fn the_service_s_content_length_frames_a_body_that_cannot_tell_its_size() {
        let (feed, body) = mpsc::channel(4);
        let (feed_2, body_2) = mpsc::channel(4);
        let bodies = Arc::new(Mutex::new(vec![Streamed(body), Streamed(body_2)]));
        let mut conn = start(limits(), streaming(bodies, Some("3")));
        conn.send(GET_A).await;
        feed.send(Ok(Bytes::from("abc"))).await.unwrap();
        drop(feed);
        let response = conn.response().await;
        assert_eq!(response.header("content-length"), Some("3"));
        assert_eq!(response.header("transfer-encoding"), None);
        assert_eq!(response.text(), "abc");

        // A body that breaks its announced length ends the connection.
        conn.send(GET_A).await;
        feed_2.send(Ok(Bytes::from("abcd"))).await.unwrap();
        let all = conn.rest().await;
        assert!(all.ends_with("content-length: 3\r\n\r\n"), "{all:?}");
    }

    #[tokio::test]
    async fn framing_headers_are_the_loop_s_own_and_date_is_added_when_missing() {
        let service = |request: Incoming| async move {
            let mut response = Response::new(Full::new(Bytes::from_static(b"abc")));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
            headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert("x-kept", HeaderValue::from_static("1"));
            headers.append("x-kept-too", HeaderValue::from_static("a"));
            headers.append("x-kept-too", HeaderValue::from_static("b"));
            if request.unwrap().uri().path() == "/dated" {
                headers.insert(header::DATE, HeaderValue::from_static("yesterday"));
            }
            response
        };
        let mut conn = start(limits(), service);
        conn.send(format!("{GET_A}GET /dated HTTP/1.1\r\nHost: h\r\n\r\n"))
            .await;
        let response = conn.response().await;
        assert_eq!(response.header("content-length"), Some("3"));
        assert_eq!(response.header("transfer-encoding"), None);
        assert_eq!(response.header("connection"), None);
        assert_eq!(response.header("x-kept"), Some("1"));
        let both: Vec<_> = response
            .headers
            .iter()
            .filter(|(n, _)| n == "x-kept-too")
            .collect();
        assert_eq!(both.len(), 2);
        assert!(response.header("date").is_some_and(|d| d.ends_with(" GMT")));
        assert_eq!(response.text(), "abc");
        assert_eq!(conn.response().await.header("date"), Some("yesterday"));
    }

    #[tokio::test]
    async fn a_head_over_the_limit_is_431() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
            "y".repeat(1024)
        );
        assert_eq!(
            refused(big.as_bytes(), 431).await,
            [Err("HeadTooLarge".to_owned())]
        );
        // Never ending: refused once the limit is reached, not when the head ends.
        let (mut conn, _) = start_echo();
        conn.send(format!("GET / HTTP/1.1\r\nX-Big: {}", "y".repeat(1100)))
            .await;
        assert_eq!(conn.response().await.status, 431);
        let many: String = (0..17).map(|i| format!("X-{i}: {i}\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\nHost: h\r\n{many}\r\n");
        refused(many.as_bytes(), 431).await;
    }

    #[tokio::test]
    async fn garbage_is_400() {
        let seen = refused(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400).await;
        assert!(seen[0].as_ref().unwrap_err().starts_with("Malformed"));
        refused(b"hello there\r\n\r\n", 400).await;
    }

    #[tokio::test]
    async fn strictness_table() {
        let post = "POST / HTTP/1.1\r\nHost: h\r\n";
        let chunked = format!("{post}Transfer-Encoding: chunked\r\n\r\n");
        let cases: Vec<(String, u16)> = vec![
            (
                format!("{post}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
                400,
            ),
            (format!("{post}Content-Length: 5, 5\r\n\r\nhello"), 400),
            (format!("{post}Content-Length: +5\r\n\r\nhello"), 400),
            (format!("{post}Content-Length: 0x5\r\n\r\nhello"), 400),
            (
                format!(
                    "{post}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                ),
                501,
            ),
            (
                format!("{post}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
                501,
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
                400,
            ),
            ("GET / HTTP/1.1\r\n\r\n".into(), 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(), 400),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n".into(), 400),
            ("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n".into(), 400),
            (
                "CONNECT cmg.example:443 HTTP/1.1\r\nHost: h\r\n\r\n".into(),
                400,
            ),
            ("GET ftp://h/x HTTP/1.1\r\nHost: h\r\n\r\n".into(), 400),
            ("GET / HTTP/2.0\r\nHost: h\r\n\r\n".into(), 400),
            (
                "GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n".into(),
                400,
            ),
            ("GET / HTTP/1.1\r\nHost : h\r\n\r\n".into(), 400),
            (format!("{chunked}5\r\nhelloX\r\n0\r\n\r\n"), 400),
            (format!("{chunked}5\r\nhelloXY0\r\n\r\n"), 400),
            (format!("{chunked}5\nhello\r\n0\r\n\r\n"), 400),
            (format!("{chunked}5 \r\nhello\r\n0\r\n\r\n"), 400),
            (format!("{chunked};x\r\nhello\r\n0\r\n\r\n"), 400),
            (format!("{chunked}-5\r\nhello\r\n0\r\n\r\n"), 400),
            (
                format!("{chunked}1ffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
                400,
            ),
            (format!("{chunked}5;a\x01b\r\nhello\r\n0\r\n\r\n"), 400),
            (
                format!("{chunked}5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(5000)),
                400,
            ),
            (format!("{chunked}0\r\nbad trailer\r\n\r\n"), 400),
            (
                format!("{chunked}0\r\nX: {}\r\n\r\n", "t".repeat(1100)),
                431,
            ),
        ];
        for (request, status) in cases {
            refused(request.as_bytes(), status).await;
        }
    }

    #[tokio::test]
    async fn absolute_form_is_accepted() {
        let (mut conn, log) = start_echo();
        conn.send("GET https://cmg.example/p?q=1 HTTP/1.1\r\nHost: cmg.example\r\n\r\n")
            .await;
        assert_eq!(conn.response().await.status, 200);
        assert_eq!(
            seen(&log)[0].as_ref().unwrap().1,
            "https://cmg.example/p?q=1"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_after_the_head_timeout() {
        let (mut conn, _) = start_echo();
        conn.send(GET_A).await;
        conn.response().await;
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!conn.server.is_finished());
        conn.send(GET_B).await;
        conn.response().await;
        // The time-out starts again after each response.
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!conn.server.is_finished());
        let waited = Instant::now();
        assert!(conn.closed().await);
        let waited = waited.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        conn.result().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_that_stops_reading_its_response_is_dropped_after_the_write_timeout() {
        // Far more than the 64 KiB the pipe holds: the write blocks while nobody reads.
        let big = Bytes::from(vec![b'x'; 512 * 1024]);
        let mut conn = start(limits(), move |_| {
            let big = big.clone();
            async move { Response::new(Full::new(big)) }
        });
        conn.send(GET_A).await;
        let started = Instant::now();
        let server = conn.server;
        let ended = tokio::time::timeout(PATIENCE, server)
            .await
            .expect("the server kept waiting for a device that does not read");
        ended.unwrap().unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= limits().write_timeout && waited < limits().write_timeout * 2,
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_does_not_complete_in_time_is_dropped_unanswered() {
        let (mut conn, log) = start_echo();
        conn.send("GET / HTTP/1.1\r\nHost: h\r\n").await;
        assert!(conn.closed().await);
        let e = conn.result().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(seen(&log).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_arrive_in_time_is_408() {
        let given = {
            let (mut conn, log) = start_echo();
            conn.send("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
                .await;
            let started = Instant::now();
            let response = conn.response().await;
            assert_eq!(response.status, 408);
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
                "{waited:?}"
            );
            assert!(conn.closed().await);
            seen(&log)
        };
        assert_eq!(given, [Err("BodyTimeout".to_owned())]);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_closes_an_idle_connection_at_once() {
        let (mut conn, _) = start_echo();
        conn.send(GET_A).await;
        conn.response().await;
        let stopped = Instant::now();
        conn.stop.send(true).unwrap();
        assert!(conn.closed().await);
        // Not the idle time-out: with the clock paused, no time passes.
        assert_eq!(stopped.elapsed(), Duration::ZERO);
        conn.result().await.unwrap();
    }

    #[tokio::test]
    async fn stop_lets_a_busy_request_finish_then_closes() {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let service = {
            let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
            move |_request: Incoming| {
                let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
                async move {
                    entered.notify_one();
                    release.notified().await;
                    Response::new(Full::new(Bytes::from_static(b"done")))
                }
            }
        };
        let mut conn = start(limits(), service);
        conn.send(format!("{GET_A}{GET_B}")).await;
        entered.notified().await;
        conn.stop.send(true).unwrap();
        release.notify_one();
        let response = conn.response().await;
        assert_eq!(response.text(), "done");
        assert_eq!(response.header("connection"), Some("close"));
        assert!(conn.closed().await, "the pipelined request is not served");
        conn.result().await.unwrap();
    }

    #[tokio::test]
    async fn the_peer_closing_between_requests_is_ok_and_in_a_request_is_not() {
        let (mut conn, _) = start_echo();
        conn.send(GET_A).await;
        conn.response().await;
        conn.client.shutdown().await.unwrap();
        conn.result().await.unwrap();

        let (mut conn, _) = start_echo();
        conn.send("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
            .await;
        conn.client.shutdown().await.unwrap();
        assert!(conn.closed().await, "no answer");
        let e = conn.result().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Hands the server one byte per read.
    struct OneByte(DuplexStream);

    impl AsyncRead for OneByte {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let mut byte = [0u8; 1];
            let mut one = ReadBuf::new(&mut byte);
            ready!(Pin::new(&mut self.0).poll_read(cx, &mut one))?;
            buf.put_slice(one.filled());
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for OneByte {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn requests_arriving_a_byte_at_a_time_still_parse() {
        let log = Log::default();
        let (client, server) = tokio::io::duplex(64 * 1024);
        let mut conn = start_on(OneByte(server), client, limits(), echo(Arc::clone(&log)));
        let requests = format!(
            "\r\nPOST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
             3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n\
             PUT /l HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nwxyz{GET_B}"
        );
        for byte in requests.as_bytes() {
            conn.send([*byte]).await;
            tokio::task::yield_now().await;
        }
        assert_eq!(conn.response().await.text(), "POST /c\nabcde");
        assert_eq!(conn.response().await.text(), "PUT /l\nwxyz");
        assert_eq!(conn.response().await.text(), "GET /b?q=1\n");
    }

    #[test]
    fn an_idle_connection_s_future_holds_no_request_state() {
        let (_client, server) = tokio::io::duplex(64);
        let (_stop, stopped) = watch::channel(false);
        let limits = limits();
        let service = |_request: Incoming| async {
            let state = [7u8; 16 * 1024];
            tokio::task::yield_now().await;
            Response::new(Full::new(Bytes::copy_from_slice(&state[..1])))
        };
        let future = serve(server, &limits, stopped, service);
        let size = std::mem::size_of_val(&future);
        // Neither the service's 16 KiB nor a read buffer: a few hundred bytes of bookkeeping.
        assert!(size < 1024, "{size} bytes");
    }

    #[test]
    fn errors_map_to_their_statuses() {
        let cases = [
            (RequestError::Malformed("x".into()), 400),
            (RequestError::HeadTooLarge, 431),
            (RequestError::BodyTooLarge, 413),
            (RequestError::BodyTimeout, 408),
            (RequestError::UnsupportedTransferCoding, 501),
            (RequestError::ExpectationFailed, 417),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
        }
    }
}
