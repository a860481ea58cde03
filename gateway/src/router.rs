//! Topic → the handlers subscribed to it, in load order. Pure.

use crate::proto::topic;

#[derive(Debug, Default, Clone)]
pub struct Router {
    routes: Vec<(String, usize)>,
}

impl Router {
    /// Builds the table from each handler's `subscribe` patterns (by handler index).
    pub fn new<'a>(subscriptions: impl IntoIterator<Item = &'a [String]>) -> Self {
        let mut routes = Vec::new();
        for (i, pats) in subscriptions.into_iter().enumerate() {
            routes.extend(pats.iter().map(|p| (p.clone(), i)));
        }
        Router { routes }
    }

    /// The handlers for `topic`, each once, in load order.
    pub fn route(&self, topic: &str, out: &mut Vec<usize>) {
        out.clear();
        for (pat, h) in &self.routes {
            if !out.contains(h) && topic::matches(pat, topic, None) {
                out.push(*h);
            }
        }
        out.sort_unstable();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_handler_once_in_load_order() {
        let subs = [
            vec!["devices/+/temp".to_string(), "devices/#".to_string()],
            vec!["other/#".to_string()],
            vec!["devices/a/temp".to_string()],
        ];
        let r = Router::new(subs.iter().map(|v| v.as_slice()));
        let mut out = Vec::new();
        r.route("devices/a/temp", &mut out);
        assert_eq!(out, vec![0, 2]);
        r.route("nowhere", &mut out);
        assert!(out.is_empty());
    }
}
