//! The device protocol v1 as pure data: frame codec, CBOR messages, topic patterns and ACLs.
//! Nothing here does I/O; the ingress moves the bytes.

pub mod frame;
pub mod msg;
pub mod topic;

/// The ALPN devices negotiate.
pub const ALPN_DEVICE: &[u8] = b"tidepool/1";

/// The ALPN operators negotiate (the admin channel, `docs/bundles.md`), on the same port.
pub const ALPN_ADMIN: &[u8] = b"tidepool-admin/1";

/// Application error codes used to close a stream or a connection (wire protocol v1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// A frame length of 0 (the framing is lost).
    BadFraming = 1,
    /// A frame length above `max_frame_bytes`.
    TooLarge = 2,
    /// A newer connection of the same device took over.
    Superseded = 3,
    /// The certificate does not belong to the role of the negotiated ALPN.
    WrongRole = 4,
    /// The gateway is stopping.
    ShuttingDown = 5,
    /// The certificate was revoked.
    Revoked = 6,
}

impl CloseCode {
    /// The reason phrase sent with the code.
    pub fn reason(self) -> &'static [u8] {
        match self {
            CloseCode::BadFraming => b"bad_framing",
            CloseCode::TooLarge => b"too_large",
            CloseCode::Superseded => b"superseded",
            CloseCode::WrongRole => b"wrong_role",
            CloseCode::ShuttingDown => b"shutting_down",
            CloseCode::Revoked => b"revoked",
        }
    }
}
