//! The HTTP sink: posts each batch as the design's JSON body with its `Idempotency-Key`
//! ([`encode`] holds the body and the status map, pure); the connection pool lives only while
//! the uplink is awake.

pub mod encode;

use std::time::Duration;

use crate::uplink::{Batch, SendResult, Sent};
pub use encode::{body, classify};

/// Posts batches to one URL. The connection pool lives only while the uplink is awake.
pub struct HttpSink {
    gateway: String,
    url: String,
    timeout: Duration,
    /// For https://: the roots (`uplink.http.ca_file`, else the public CAs built in) and the
    /// clock floor's time ([`crate::uplink::tls_client`]).
    tls: rustls::ClientConfig,
    client: Option<reqwest::Client>,
}

/// Why the HTTP sink cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    #[error("uplink.http.ca_file: {0}")]
    Ca(#[from] crate::pki::PkiError),
    #[error("uplink.http: TLS: {0}")]
    Tls(#[from] rustls::Error),
}

impl HttpSink {
    /// A sink posting to `url`; `ca_file` (empty: the public CAs built in) is what an
    /// https:// cloud's certificate must chain to.
    pub fn new(
        gateway: String,
        url: String,
        timeout: Duration,
        ca_file: &std::path::Path,
    ) -> Result<Self, HttpSetupError> {
        let roots = match ca_file.as_os_str().is_empty() {
            true => rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
            false => crate::pki::root_store(ca_file)?,
        };
        let mut tls = crate::uplink::tls_client(roots)?;
        // reqwest sets no ALPN on a config it is given: HTTP/1.1, as it would offer.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HttpSink {
            gateway,
            url,
            timeout,
            tls,
            client: None,
        })
    }
}

impl crate::uplink::Sink for HttpSink {
    const RETRY_AS_IS: bool = true;

    async fn send(&mut self, batch: &Batch) -> Sent {
        let body = body(&self.gateway, &batch.id, &batch.entries);
        let len = body.len() as u64;
        let (result, reached) = self.post(batch, body).await;
        // Bytes count when the request reached the cloud (not when no connection was made).
        Sent {
            result,
            bytes: if reached { len } else { 0 },
        }
    }

    fn close(&mut self) {
        self.client = None;
    }
}

impl HttpSink {
    /// Posts the body; the second value says whether a connection carried it.
    async fn post(&mut self, batch: &Batch, body: Vec<u8>) -> (SendResult, bool) {
        if self.client.is_none() {
            // No redirects: a POST turned into a GET by a 30x must not count as delivered.
            let builder = reqwest::Client::builder()
                .timeout(self.timeout)
                .redirect(reqwest::redirect::Policy::none())
                .use_preconfigured_tls(self.tls.clone());
            match builder.build() {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    let why = format!("HTTP client: {e}");
                    return (SendResult::Retry { alarm: true, why }, false);
                }
            }
        }
        let Some(client) = &self.client else {
            unreachable!("client set above")
        };
        let req = client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &batch.id)
            .body(body);
        match req.send().await {
            Ok(resp) => (classify(resp.status().as_u16()), true),
            Err(e) => {
                // The connection may be broken: start a fresh one next time.
                self.client = None;
                let reached = !e.is_connect();
                (
                    SendResult::Retry {
                        alarm: false,
                        why: format!("{e}"),
                    },
                    reached,
                )
            }
        }
    }
}
