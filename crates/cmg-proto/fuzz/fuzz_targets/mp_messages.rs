//! Any request body a device (or a gateway) sends to a management point, and any gateway
//! path: decoding refuses or accepts, never panics, and what decodes encodes back to the same
//! value.
#![no_main]

use cmg_proto::mp::{RegistrationRequest, StatusBatch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<RegistrationRequest>(data) {
        let again = serde_json::to_vec(&request).expect("encodes");
        assert_eq!(
            serde_json::from_slice::<RegistrationRequest>(&again).ok(),
            Some(request)
        );
    }
    if let Ok(batch) = serde_json::from_slice::<StatusBatch>(data) {
        serde_json::to_vec(&batch).expect("encodes");
    }
    if let Ok(path) = std::str::from_utf8(data) {
        let _ = cmg_proto::tunnel::split_proxy_path(path);
    }
});
