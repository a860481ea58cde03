//! Topic and subject templates (pure), shared by the MQTT and NATS sinks: `{gateway}`,
//! `{device}`, `{topic}` and `{class}` are replaced by the entry's values. Checked at start:
//! no character the sink forbids (wildcards), no unknown placeholder.

use crate::outbox::Entry;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Gateway,
    Device,
    Topic,
    Class,
}

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

impl Template {
    /// Parses `s`; `forbidden` are the characters the sink does not allow (its wildcards).
    pub fn parse(s: &str, forbidden: &[char]) -> Result<Template, String> {
        if s.is_empty() {
            return Err("empty template".into());
        }
        if s.contains(forbidden) || s.contains('\0') {
            return Err(format!(
                "`{s}`: a name to publish to has none of {forbidden:?} (wildcards)"
            ));
        }
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].into()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("`{s}`: a `{{` without its `}}`"));
            };
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "gateway" => Part::Gateway,
                "device" => Part::Device,
                "topic" => Part::Topic,
                "class" => Part::Class,
                other => {
                    return Err(format!(
                        "`{s}`: unknown placeholder `{{{other}}}` (use {{gateway}}, {{device}}, {{topic}}, {{class}})"
                    ))
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.into()));
        }
        Ok(Template(parts))
    }

    /// The topic of `e` from gateway `gateway`.
    pub fn render(&self, gateway: &str, e: &Entry) -> String {
        let mut out = String::new();
        for p in &self.0 {
            out.push_str(match p {
                Part::Text(t) => t,
                Part::Gateway => gateway,
                Part::Device => &e.device,
                Part::Topic => &e.topic,
                Part::Class => e.class.as_str(),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Class;

    #[test]
    fn placeholders_are_replaced_and_bad_templates_refused() {
        let e = Entry {
            id: "gw:d1:1:h:0".into(),
            device: "d1".into(),
            topic: "devices/d1/temp".into(),
            class: Class::Urgent,
            ts: 0,
            queued_ms: 0,
            payload: vec![],
            tier_seq: None,
            tier_nack: None,
            boot: None,
        };
        const MQTT: &[char] = &['+', '#'];
        let t = Template::parse("tp/{gateway}/{class}/{topic}", MQTT).unwrap();
        assert_eq!(t.render("gw", &e), "tp/gw/urgent/devices/d1/temp");
        assert_eq!(
            Template::parse("{device}", MQTT).unwrap().render("gw", &e),
            "d1"
        );
        for bad in ["", "a/+/b", "a/#", "a/{nope}", "a/{gateway"] {
            assert!(Template::parse(bad, MQTT).is_err(), "{bad}");
        }
        assert!(Template::parse("a.*.b", &['*', '>', ' ']).is_err());
    }
}
