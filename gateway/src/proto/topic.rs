//! Topics and MQTT-style topic patterns (`+` one level, `#` the rest), and the publish ACL
//! where a pattern level `{id}` matches exactly the device id. No I/O.

/// Longest topic accepted, in bytes.
pub const MAX_TOPIC_BYTES: usize = 256;

/// Why a topic is refused (`nack bad_topic`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than {MAX_TOPIC_BYTES} bytes")]
    TooLong,
    #[error("topic contains a wildcard or NUL")]
    Wildcard,
    #[error("topic contains a control or invisible formatting character")]
    Control,
    #[error("topic has an empty level")]
    EmptyLevel,
    #[error("topic has a `.` or `..` level")]
    DotLevel,
}

/// Checks a concrete topic that a device or a handler publishes to.
pub fn validate(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong);
    }
    if topic.contains(['+', '#', '\0']) {
        return Err(TopicError::Wildcard);
    }
    // A topic ends up in logs, journals, terminals and other brokers: no escapes, no forged
    // lines, no text that reads other than it is.
    if topic.chars().any(hides_text) {
        return Err(TopicError::Control);
    }
    let mut levels = topic.split('/');
    if levels.clone().any(str::is_empty) {
        return Err(TopicError::EmptyLevel);
    }
    // Downstream a topic may become a path (a file, a URL, a NATS subject): it must not climb.
    if levels.any(|l| l == "." || l == "..") {
        return Err(TopicError::DotLevel);
    }
    Ok(())
}

/// Whether `topic` matches `pattern`. In the pattern, `+` matches one level, a final `#`
/// matches any number of remaining levels (zero included), and a level equal to `{id}` matches
/// exactly `device` when one is given.
pub fn matches(pattern: &str, topic: &str, device: Option<&str>) -> bool {
    let mut pat = pattern.split('/');
    let mut top = topic.split('/');
    loop {
        match (pat.next(), top.next()) {
            (Some("#"), _) => return true,
            (Some(p), Some(t)) => {
                let ok = match p {
                    "+" => true,
                    "{id}" => device == Some(t),
                    _ => p == t,
                };
                if !ok {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `topic` lies in another device's part of the ACL: it matches `pattern` with its
/// `{id}` level read as any one level, and that level is not `device`. An event a handler
/// emits there would pass for that device's own (a handler subscribed to `devices/+/temp`
/// reads the device from the topic). Patterns without `{id}` name no device.
pub fn names_other_device(pattern: &str, topic: &str, device: &str) -> bool {
    let mut pat = pattern.split('/');
    let mut top = topic.split('/');
    let mut other = false;
    loop {
        match (pat.next(), top.next()) {
            (Some("#"), _) => return other,
            (Some(p), Some(t)) => match p {
                "+" => {}
                "{id}" => other |= t != device,
                _ if p == t => {}
                _ => return false,
            },
            (None, None) => return other,
            _ => return false,
        }
    }
}

/// Checks a subscription or ACL pattern: `#` only as the last level, wildcards only as whole levels.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("empty pattern".into());
    }
    let levels: Vec<&str> = pattern.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err(format!("`#` must be a whole last level in `{pattern}`"));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("`+` must be a whole level in `{pattern}`"));
        }
    }
    Ok(())
}

/// Whether `c` can forge or hide text where it is printed: a control character (C0, DEL, C1)
/// or an invisible formatting one (bidi overrides and isolates, zero-width characters, line
/// and paragraph separators, the BOM, soft hyphen, interlinear annotations).
pub fn hides_text(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{ad}' | '\u{61c}' | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}')
}

/// A device id: `[A-Za-z0-9._-]{1,64}`, and not `.` or `..` (a topic level, a file or a
/// path segment downstream must not climb).
pub fn valid_device_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_wildcards() {
        assert!(matches("devices/+/temp", "devices/a/temp", None));
        assert!(!matches("devices/+/temp", "devices/a/b/temp", None));
        assert!(matches("devices/#", "devices", None));
        assert!(matches("devices/#", "devices/a/b", None));
        assert!(!matches("devices/a", "devices/a/b", None));
        assert!(!matches("devices/a/b", "devices/a", None));
    }

    #[test]
    fn id_is_one_literal_level_never_text_substitution() {
        assert!(matches("devices/{id}/#", "devices/d1/temp", Some("d1")));
        assert!(!matches("devices/{id}/#", "devices/d2/temp", Some("d1")));
        assert!(!matches("devices/{id}/#", "devices/d1x/temp", Some("d1")));
        assert!(!matches("devices/{id}/#", "devices/d1/temp", None));
        // A device named like a wildcard cannot widen its ACL: ids cannot contain '+' or '#'.
        assert!(!valid_device_id("+"));
        assert!(!valid_device_id("a/b"));
    }

    #[test]
    fn another_devices_part_of_the_acl() {
        let acl = "devices/{id}/#";
        assert!(names_other_device(acl, "devices/d2/temp", "d1"));
        assert!(!names_other_device(acl, "devices/d1/temp", "d1"));
        assert!(!names_other_device(acl, "alarms/d2", "d1"));
        assert!(!names_other_device("shared/#", "shared/x", "d1"));
        // A timer's tree has no device: every device's part is another's.
        assert!(names_other_device(acl, "devices/d1/x", ""));
    }

    #[test]
    fn topic_validation() {
        assert!(validate("devices/d1/temp").is_ok());
        assert_eq!(validate(""), Err(TopicError::Empty));
        assert_eq!(validate("a/+/b"), Err(TopicError::Wildcard));
        assert_eq!(validate("a//b"), Err(TopicError::EmptyLevel));
        assert_eq!(validate(&"a".repeat(257)), Err(TopicError::TooLong));
        for t in [
            "a/b\nc",
            "a/\u{1b}[2J",
            "a/\u{7f}",
            "a/\u{85}x",
            "a\r",
            "a/\u{202e}x",
            "a/\u{200b}",
        ] {
            assert_eq!(validate(t), Err(TopicError::Control), "{t:?}");
        }
        for t in ["devices/../x", "./a", "a/.", "a/../.."] {
            assert_eq!(validate(t), Err(TopicError::DotLevel), "{t:?}");
        }
        assert!(validate("a/.b/c..d/...").is_ok());
    }

    #[test]
    fn device_ids() {
        assert!(valid_device_id("dev-1.a_B"));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id(&"a".repeat(65)));
        assert!(!valid_device_id("dev 1"));
        assert!(!valid_device_id("."));
        assert!(!valid_device_id(".."));
        assert!(valid_device_id("..."));
    }
}
