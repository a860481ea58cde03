//! The device side of wire protocol v1, used by `tidepool send`, the tests and the load
//! generator: connect with a device certificate, open a stream, send frames, read answers.

use std::net::SocketAddr;
use std::path::Path;

use quinn::{Connection, Endpoint, RecvStream, SendStream};

use crate::ingress::tls::{self, TlsError};
use crate::proto::frame::{self, FrameDecoder, FrameError};
use crate::proto::msg::{self, BadFrame, DeviceMsg, GatewayMsg};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot resolve {0}")]
    Resolve(String),
    // Not a `source` as well: `{:#}` would print the TLS error twice.
    #[error("connect: {0}")]
    Connect(quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(quinn::ConnectionError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("bad frame from gateway: {0}")]
    Frame(#[from] FrameError),
    #[error("bad message from gateway: {0}")]
    Message(#[from] BadFrame),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl From<quinn::ConnectError> for ClientError {
    fn from(e: quinn::ConnectError) -> Self {
        ClientError::Connect(e)
    }
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        ClientError::Connection(e)
    }
}

/// The largest answer frame a device reads: answers are a few dozen bytes (a nack's reason a
/// few hundred), and a hostile gateway (an upstream, for the tier uplink) must not make a device
/// buffer more, nor decode more into a CBOR tree (about 32 bytes a value).
pub const ANSWER_BYTES: u32 = 64 * 1024;

/// A device's connection to a gateway.
pub struct Device {
    pub endpoint: Endpoint,
    pub conn: Connection,
}

/// Resolves `host:port`; returns the address and the TLS server name (the host).
pub async fn resolve(gateway: &str) -> Result<(SocketAddr, String), ClientError> {
    let addr = tokio::net::lookup_host(gateway)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ClientError::Resolve(gateway.to_string()))?;
    let host = gateway.rsplit_once(':').map(|(h, _)| h).unwrap_or(gateway);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((addr, host.to_string()))
}

impl Device {
    /// Connects with the device's certificate and key, trusting `ca`.
    pub async fn connect(
        gateway: &str,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Device, ClientError> {
        Device::connect_with(gateway, tls::client_config(ca, cert, key)?).await
    }

    /// Connects with a client config of the caller's (from [`tls::client_config`], with its
    /// own transport settings, e.g. keep-alives).
    pub async fn connect_with(
        gateway: &str,
        config: quinn::ClientConfig,
    ) -> Result<Device, ClientError> {
        Device::connect_from(gateway, config, None).await
    }

    /// As [`Device::connect_with`], from a local address of the caller's (`None`: any).
    pub async fn connect_from(
        gateway: &str,
        config: quinn::ClientConfig,
        bind: Option<SocketAddr>,
    ) -> Result<Device, ClientError> {
        let (addr, name) = resolve(gateway).await?;
        let any: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .expect("literal address");
        let mut endpoint = Endpoint::client(bind.unwrap_or(any))?;
        endpoint.set_default_client_config(config);
        let conn = endpoint.connect(addr, &name)?.await?;
        Ok(Device { endpoint, conn })
    }

    /// Opens a bidirectional stream for frames.
    pub async fn open(&self) -> Result<FrameStream, ClientError> {
        let (send, recv) = self.conn.open_bi().await?;
        Ok(FrameStream {
            send,
            recv,
            decoder: FrameDecoder::new(ANSWER_BYTES),
            out: Vec::new(),
        })
    }

    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

/// One stream of frames.
pub struct FrameStream {
    pub send: SendStream,
    pub recv: RecvStream,
    decoder: FrameDecoder,
    out: Vec<u8>,
}

impl FrameStream {
    /// Queues a message (written by the next [`FrameStream::flush`]).
    pub fn push(&mut self, m: &DeviceMsg) {
        frame::encode(&msg::encode_device(m), &mut self.out);
    }

    /// Queues an encoded message (the CBOR body of one frame).
    pub fn push_body(&mut self, body: &[u8]) {
        frame::encode(body, &mut self.out);
    }

    /// Ends the sending side: the gateway settles what it read, then ends its side.
    pub fn finish(&mut self) -> Result<(), ClientError> {
        Ok(self.send.finish()?)
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.send.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    /// Sends one message now.
    pub async fn send(&mut self, m: &DeviceMsg) -> Result<(), ClientError> {
        self.push(m);
        self.flush().await
    }

    /// Sends raw bytes (tests of malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        Ok(self.send.write_all(bytes).await?)
    }

    /// The next message from the gateway; `None` when the gateway finished the stream.
    /// Messages of unknown types are skipped, as devices must.
    pub async fn next(&mut self) -> Result<Option<GatewayMsg>, ClientError> {
        loop {
            if let Some(f) = self.decoder.next_frame()? {
                match msg::decode_gateway(&f)? {
                    Some(m) => return Ok(Some(m)),
                    None => continue,
                }
            }
            match self.recv.read_chunk(64 * 1024, true).await? {
                Some(c) => self.decoder.extend(&c.bytes),
                None => return Ok(None),
            }
        }
    }
}
