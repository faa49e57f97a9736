//! Entry points for the fuzz targets in `crates/cmg-gateway/fuzz`, built only with the `fuzzing`
//! feature: the device-facing parsers, driven with arbitrary bytes and no network.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Full;
use hyper::Response;
use hyper::body::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::h1;

/// Serves `input` as everything one device sent on an HTTP/1.1 connection before closing its
/// side, answering each request with its method, target and body (and each unreadable one with
/// its status), and returns what the gateway wrote back. Panics only where the loop would.
pub fn h1_connection(input: &[u8]) -> Vec<u8> {
    let limits = h1::Limits {
        max_head_bytes: 2048,
        max_headers: 16,
        max_body_bytes: 4096,
        head_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(30),
        write_timeout: Duration::from_secs(30),
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return Vec::new();
    };
    runtime.block_on(async {
        let (mut device, gateway) = tokio::io::duplex(64 * 1024);
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let served = tokio::spawn(async move {
            h1::serve(gateway, &limits, stopped, |request| async move {
                match request {
                    Ok(request) => {
                        let mut text =
                            format!("{} {}\n", request.method(), request.uri()).into_bytes();
                        let (_, body) = request.into_parts();
                        text.extend_from_slice(
                            &http_body_util::BodyExt::collect(body).await.map_or_else(
                                |never: Infallible| match never {},
                                |body| body.to_bytes(),
                            ),
                        );
                        Response::new(Full::new(Bytes::from(text)))
                    }
                    Err(e) => {
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = e.status();
                        response
                    }
                }
            })
            .await
        });
        // Sent whole, then the device's side closes: the loop never waits for more.
        let (mut from_gateway, mut to_gateway) = tokio::io::split(&mut device);
        let send = async {
            let _ = to_gateway.write_all(input).await;
            let _ = to_gateway.shutdown().await;
        };
        let mut out = Vec::new();
        let receive = from_gateway.read_to_end(&mut out);
        let _ = tokio::join!(send, receive);
        if let Err(e) = served.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        out
    })
}

/// Checks that `out` is a sequence of whole HTTP/1.1 responses, each (but `100 Continue`) with a
/// `Content-Length` and that many bytes of body; returns how many there were.
pub fn responses(out: &[u8]) -> Result<usize, String> {
    let mut rest = out;
    let mut count = 0;
    while !rest.is_empty() {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut slots);
        let Ok(httparse::Status::Complete(used)) = response.parse(rest) else {
            return Err(format!(
                "not a response: {:?}",
                String::from_utf8_lossy(rest)
            ));
        };
        let body = if response.code == Some(100) {
            0
        } else {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                .ok_or("an answer without a Content-Length")?
        };
        rest = rest
            .get(used + body..)
            .ok_or("an answer's body is cut short")?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pipelined_pair_and_a_refused_request_come_back_as_three_answers() {
        let out = super::h1_connection(
            b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n\
              POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi\
              POST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(super::responses(&out), Ok(3));
        let out = String::from_utf8(out).unwrap();
        let statuses: Vec<&str> = out
            .match_indices("HTTP/1.1 ")
            .map(|(at, _)| &out[at + 9..at + 12])
            .collect();
        assert_eq!(statuses, ["200", "200", "400"], "{out}");
        assert!(
            out.contains("GET /a\n") && out.contains("POST /b\nhi"),
            "{out}"
        );
    }
}
