//! A frame body as a device message and as a gateway message: decoding never panics, and a
//! publish that decodes has the seq the caller required.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool::proto::msg::{decode, decode_gateway, DeviceMsg};

fuzz_target!(|data: &[u8]| {
    for require_seq in [true, false] {
        if let Ok(DeviceMsg::Publish(p)) = decode(data, require_seq) {
            assert!(!require_seq || p.seq > 0);
        }
    }
    let _ = decode_gateway(data);
});
