//! Any bytes a device sends on an HTTP/1.1 connection: the gateway's loop never panics, the
//! connection ends, and what it writes back is a sequence of well-formed responses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = cmg_gateway::fuzzing::h1_connection(data);
    if let Err(e) = cmg_gateway::fuzzing::responses(&out) {
        panic!("{e}");
    }
});
