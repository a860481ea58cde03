//! A bundle on any bytes (its frame, its signature against a fixed trusted key) and a handler
//! or config manifest on any text: refused with a reason or read, never a panic. A fuzzer
//! cannot forge a signature, so the manifests are also parsed on their own, as a box parses
//! them once one holds (a config bundle's settings checked on top of the defaults too).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool::admin::bundle;

fuzz_target!(|data: &[u8]| {
    let trusted = bundle::PublicKey::parse("ed25519:zHRxdEhGfMwDsOOJB02yRtf9HhlDOPbwGAuhwqlu+eM=")
        .expect("a valid key");
    let _ = bundle::verify_any(data, 1 << 20, &[trusted]);
    if let Ok(f) = bundle::frame(data, 1 << 20) {
        let _ = f.signature_holds();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bundle::parse_manifest(text);
        if let Ok(m) = bundle::parse_config(text) {
            let _ = tidepool::config::Config::defaults().overlaid(&m);
        }
    }
});
