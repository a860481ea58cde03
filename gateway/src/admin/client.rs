//! The operator's side of the admin channel: one request of the control protocol
//! (`control.rs`) to a gateway over QUIC, with an operator certificate, its answer streamed out
//! without its trailer. An operator profile (`tidepool certs operator` writes one) names the
//! gateway and the files, so commands need only `--profile`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::client::{resolve, ClientError};
use crate::control::Answer;
use crate::ingress::tls;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{path}: {why}")]
    Profile { path: PathBuf, why: String },
    #[error("no answer from {0} within {1:?}: is the address right, and admin.allow_from open to this machine?")]
    Timeout(String, Duration),
    #[error("{0} stopped answering for {1:?}: what it did with the request is unknown (see `tidepool list`)")]
    NoAnswer(String, Duration),
    #[error("the gateway closed the connection: {0}")]
    Closed(String),
}

/// Where an operator reaches a gateway, and with what.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Remote {
    /// `host:port` of the gateway.
    pub gateway: String,
    /// The gateway's server CA (`ca.crt`), which its certificate chains to.
    pub ca: PathBuf,
    /// The operator's certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How long connecting may take, and then the wait for each part of the answer (a deploy may
/// wait its turn to upload, up to 300 s on the gateway).
const CONNECT: Duration = Duration::from_secs(10);
const ANSWER: Duration = Duration::from_secs(360);

impl Remote {
    /// Reads an operator profile (TOML: `gateway`, `ca`, `cert`, `key`; relative paths are
    /// relative to the profile's folder).
    pub fn from_profile(path: &Path) -> Result<Remote, AdminError> {
        let err = |why: String| AdminError::Profile {
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut r: Remote = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut r.ca, &mut r.cert, &mut r.key] {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(r)
    }

    /// Sends one request line (and `body`, for a deploy) and streams the answer, without its
    /// trailer, to `out`. An `#error` answer is an error with the gateway's reason.
    pub async fn ask<W: Write + ?Sized>(
        &self,
        line: &str,
        body: &[u8],
        out: &mut W,
    ) -> Result<(), AdminError> {
        let config =
            tls::admin_client_config(&self.ca, &self.cert, &self.key).map_err(ClientError::from)?;
        let (addr, name) = resolve(&self.gateway).await?;
        let any = match addr.is_ipv6() {
            true => std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
            false => std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
        };
        let mut endpoint = quinn::Endpoint::client(any)?;
        endpoint.set_default_client_config(config);
        let connecting = endpoint.connect(addr, &name).map_err(ClientError::from)?;
        let conn = tokio::time::timeout(CONNECT, connecting)
            .await
            .map_err(|_| AdminError::Timeout(self.gateway.clone(), CONNECT))?
            .map_err(ClientError::from)?;
        let asked = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(ClientError::from)?;
            // Sent while the answer is read: a gateway that refuses a bundle from its length
            // answers and stops reading, and its answer is what counts.
            let sending = async {
                send.write_all(format!("{line}\n").as_bytes()).await?;
                send.write_all(body).await?;
                send.finish()?;
                Ok::<_, ClientError>(())
            };
            let reading = async {
                let mut answer = Answer::default();
                loop {
                    let chunk = tokio::time::timeout(ANSWER, recv.read_chunk(64 * 1024, true))
                        .await
                        .map_err(|_| AdminError::NoAnswer(self.gateway.clone(), ANSWER))?
                        .map_err(ClientError::from)?;
                    match chunk {
                        Some(c) => answer.feed(&c.bytes, &mut *out)?,
                        None => break,
                    }
                }
                Ok::<_, AdminError>(answer.finish()?)
            };
            let (sent, answered) = tokio::join!(sending, reading);
            match (answered, sent) {
                (Ok(()), _) => Ok(()),
                (Err(e @ AdminError::Io(_)), _) => Err(e),
                (Err(e), Ok(())) => Err(e),
                (Err(_), Err(e)) => Err(e.into()),
            }
        };
        let result = asked.await;
        // The gateway's own reason (a wrong role, a revoked operator) beats the stream's error.
        let result = match (result, conn.close_reason()) {
            (Err(_), Some(quinn::ConnectionError::ApplicationClosed(c))) => {
                Err(AdminError::Closed(format!(
                    "{} ({})",
                    String::from_utf8_lossy(&c.reason),
                    c.error_code
                )))
            }
            (Err(_), Some(quinn::ConnectionError::ConnectionClosed(c))) => {
                Err(AdminError::Closed(c.to_string()))
            }
            (r, _) => r,
        };
        conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        result
    }
}
