//! Any bytes a device sends on an HTTP/1.1 connection: the gateway's loop never panics, the
//! connection ends, and what it writes back is a sequence of well-formed responses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = cmg_gateway::fuzzing::h1_connection(data);
    let mut rest = out.as_slice();
    while !rest.is_empty() {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut slots);
        let Ok(httparse::Status::Complete(used)) = response.parse(rest) else {
            panic!("not a response: {:?}", String::from_utf8_lossy(rest));
        };
        let length = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok());
        let body = match response.code {
            Some(100) => 0,
            _ => length.expect("every answer here has a length"),
        };
        rest = rest.get(used + body..).expect("the body is complete");
    }
});
