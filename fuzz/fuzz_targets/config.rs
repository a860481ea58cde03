//! The config file on any text: it loads or says why, and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tidepool::config::Config::from_toml_str(text, std::path::Path::new("fuzz.toml"));
    }
});
