//! Topics, patterns and ACL matching on any text: nothing panics, a valid topic holds no
//! wildcard, control or invisible character and no empty, `.` or `..` level, and an `{id}`
//! pattern never lets a topic pass for a device id that is not the one matched.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool::proto::topic;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, rest) = text.split_once('\n').unwrap_or((text, ""));
    let (t, device) = rest.split_once('\n').unwrap_or((rest, "d1"));
    if topic::validate(t).is_ok() {
        assert!(!t.is_empty() && t.len() <= topic::MAX_TOPIC_BYTES);
        assert!(!t.contains(['+', '#']) && !t.chars().any(topic::hides_text));
        assert!(t.split('/').all(|l| !l.is_empty() && l != "." && l != ".."));
    }
    let _ = topic::validate_pattern(pattern);
    let _ = topic::valid_device_id(device);
    if topic::matches(pattern, t, Some(device)) && pattern.split('/').any(|l| l == "{id}") {
        assert!(!topic::names_other_device(pattern, t, device));
    }
});
