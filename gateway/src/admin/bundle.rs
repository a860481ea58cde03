//! Signed bundles (`.tpb`): the file format, ed25519 keys, signing and strict verification
//! (pure: bytes in, values out; the CLI and the deploy path do the files). The format is in
//! `docs/bundles.md`; DESIGN names the signed bytes:
//!
//! ```text
//! "tidepool-bundle-v1\0" ‖ u32 BE len ‖ manifest ‖ u32 BE len ‖ wasm     (signed, as is)
//! ‖ 32-byte ed25519 public key ‖ 64-byte signature                        (nothing after)
//! ```
//!
//! So the file's head *is* the signed message: nothing is re-encoded before the check. A
//! bundle is read in this order, and refused at the first step that fails: its size (before
//! anything is parsed), its frame (magic, lengths, no trailing byte), its key (one of the
//! trusted keys), its signature (ring's ed25519, strict), and only then its manifest (UTF-8
//! TOML, a known `kind`). Nothing an untrusted author wrote is parsed before the signature
//! holds. Checking the module against the ABI and the box's caps is the deploy's job.

use std::fmt;

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::config::ConfigManifest;
use crate::sandbox::manifest::{Kind, Manifest};

/// What the signed message, and so every bundle, starts with.
pub const MAGIC: &[u8] = b"tidepool-bundle-v1\0";
/// The tests' size cap (a box's is `deploy.max_bundle_bytes`).
#[cfg(test)]
const MAX_BUNDLE_BYTES: u64 = 16 << 20;
/// How a public key is written (in `trusted_keys`, in `.pub` files): this, then base64.
pub const KEY_PREFIX: &str = "ed25519:";

const KEY_LEN: usize = 32;
const SIG_LEN: usize = 64;

/// Why a bundle, a key or a signature is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle is {len} bytes, more than the {max} allowed (deploy.max_bundle_bytes)")]
    TooLarge { len: u64, max: u64 },
    #[error("not a Tidepool bundle (it does not start with `tidepool-bundle-v1`)")]
    NotABundle,
    #[error("the bundle is cut short: {0} is missing or shorter than its length says")]
    Truncated(&'static str),
    #[error("the bundle has {0} bytes after its signature")]
    TrailingBytes(usize),
    #[error("signed by key {0}, which is not in trusted_keys")]
    UntrustedKey(String),
    #[error("the signature does not match the bundle's contents (changed after signing, or signed with another key)")]
    BadSignature,
    #[error("the manifest is not UTF-8")]
    ManifestNotText,
    #[error("the manifest: {0}")]
    Manifest(String),
    #[error("a public key must be `ed25519:` and 32 bytes in base64: {0}")]
    BadPublicKey(String),
    #[error("the signing key is not an ed25519 PKCS#8 key: {0}")]
    BadSigningKey(String),
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// `ed25519:<base64 of the 32 bytes>`, as `Display` writes it.
    pub fn parse(text: &str) -> Result<PublicKey, BundleError> {
        let bad = || BundleError::BadPublicKey(format!("`{}`", text.trim()));
        let b64 = text.trim().strip_prefix(KEY_PREFIX).ok_or_else(bad)?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad())?;
        Ok(PublicKey(raw.try_into().map_err(|_| bad())?))
    }

    /// The key id: the SHA-256 of its 32 bytes, in hex (what `bundle inspect` and every refusal
    /// name a key by).
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.0);
        write!(f, "{KEY_PREFIX}{b64}")
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// An ed25519 key pair that signs bundles (an operator's, never on a box).
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// A new key pair and its PKCS#8 (v2) DER, to be kept secret.
    pub fn generate() -> Result<(SigningKey, Vec<u8>), BundleError> {
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|e| BundleError::BadSigningKey(e.to_string()))?;
        let key = SigningKey::from_pkcs8(der.as_ref())?;
        Ok((key, der.as_ref().to_vec()))
    }

    /// A key from its PKCS#8 DER (as `generate` wrote it).
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, BundleError> {
        Ed25519KeyPair::from_pkcs8(der)
            .map(SigningKey)
            .map_err(|e| BundleError::BadSigningKey(e.to_string()))
    }

    pub fn public(&self) -> PublicKey {
        let mut raw = [0; KEY_LEN];
        raw.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(raw)
    }
}

/// The signed message: the magic and the two length-prefixed parts.
fn signed_message(manifest: &[u8], wasm: &[u8]) -> Result<Vec<u8>, BundleError> {
    let len = |part: &[u8]| {
        u32::try_from(part.len())
            .map(u32::to_be_bytes)
            .map_err(|_| BundleError::TooLarge {
                len: part.len() as u64,
                max: u64::from(u32::MAX),
            })
    };
    let (m, w) = (len(manifest)?, len(wasm)?);
    let mut out = Vec::with_capacity(MAGIC.len() + 8 + manifest.len() + wasm.len() + 96);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&m);
    out.extend_from_slice(manifest);
    out.extend_from_slice(&w);
    out.extend_from_slice(wasm);
    Ok(out)
}

/// A bundle of `manifest` (TOML text) and `wasm`, signed with `key`: the `.tpb` file's bytes.
pub fn build(manifest: &str, wasm: &[u8], key: &SigningKey) -> Result<Vec<u8>, BundleError> {
    let mut out = signed_message(manifest.as_bytes(), wasm)?;
    let sig = key.0.sign(&out);
    out.extend_from_slice(&key.public().0);
    out.extend_from_slice(sig.as_ref());
    Ok(out)
}

/// A bundle's parts as framed, nothing checked but the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed<'a> {
    /// The signed message (the file's head).
    pub signed: &'a [u8],
    pub manifest: &'a [u8],
    pub wasm: &'a [u8],
    pub signer: PublicKey,
    pub signature: &'a [u8],
}

/// Splits a bundle's bytes by its frame, after checking its size against `max`.
pub fn frame(bytes: &[u8], max: u64) -> Result<Framed<'_>, BundleError> {
    let len = bytes.len() as u64;
    if len > max {
        return Err(BundleError::TooLarge { len, max });
    }
    let rest = bytes.strip_prefix(MAGIC).ok_or(BundleError::NotABundle)?;
    let (manifest, rest) = part(rest, "the manifest")?;
    let (wasm, rest) = part(rest, "the module")?;
    let signed = &bytes[..bytes.len() - rest.len()];
    if rest.len() < KEY_LEN + SIG_LEN {
        return Err(BundleError::Truncated("the key and signature"));
    }
    if rest.len() > KEY_LEN + SIG_LEN {
        return Err(BundleError::TrailingBytes(rest.len() - KEY_LEN - SIG_LEN));
    }
    let mut signer = [0; KEY_LEN];
    signer.copy_from_slice(&rest[..KEY_LEN]);
    Ok(Framed {
        signed,
        manifest,
        wasm,
        signer: PublicKey(signer),
        signature: &rest[KEY_LEN..],
    })
}

/// One `u32 BE len ‖ bytes` part, and what follows it.
fn part<'a>(b: &'a [u8], what: &'static str) -> Result<(&'a [u8], &'a [u8]), BundleError> {
    let (len, rest) = b
        .split_first_chunk::<4>()
        .ok_or(BundleError::Truncated(what))?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err(BundleError::Truncated(what));
    }
    Ok(rest.split_at(len))
}

impl Framed<'_> {
    /// Whether the signature holds for the signer's key (trusted or not).
    pub fn signature_holds(&self) -> bool {
        UnparsedPublicKey::new(&ED25519, self.signer.0)
            .verify(self.signed, self.signature)
            .is_ok()
    }
}

/// A handler bundle whose signer is trusted and whose signature holds, its manifest parsed.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    pub wasm: Vec<u8>,
    pub signer: PublicKey,
}

/// A config bundle whose signer is trusted and whose signature holds, its manifest parsed.
#[derive(Debug, Clone)]
pub struct VerifiedConfig {
    pub manifest: ConfigManifest,
    pub signer: PublicKey,
}

/// A verified bundle of either kind.
#[derive(Debug, Clone)]
pub enum Signed {
    Handler(Verified),
    Config(VerifiedConfig),
}

/// Reads a bundle as a gateway does: size, frame, a trusted signer, the signature, then the
/// manifest (its `kind` first). `trusted` is the box's `trusted_keys`.
pub fn verify_any(bytes: &[u8], max: u64, trusted: &[PublicKey]) -> Result<Signed, BundleError> {
    let f = frame(bytes, max)?;
    if !trusted.contains(&f.signer) {
        return Err(BundleError::UntrustedKey(f.signer.fingerprint()));
    }
    if !f.signature_holds() {
        return Err(BundleError::BadSignature);
    }
    let text = std::str::from_utf8(f.manifest).map_err(|_| BundleError::ManifestNotText)?;
    match kind_of(text)? {
        Kind::Handler => Ok(Signed::Handler(Verified {
            manifest: parse_manifest(text)?,
            wasm: f.wasm.to_vec(),
            signer: f.signer,
        })),
        Kind::Config => {
            if !f.wasm.is_empty() {
                return Err(BundleError::Manifest(
                    "a config bundle carries no module".into(),
                ));
            }
            Ok(Signed::Config(VerifiedConfig {
                manifest: parse_config(text)?,
                signer: f.signer,
            }))
        }
    }
}

/// As [`verify_any`], for a handler bundle only.
pub fn verify(bytes: &[u8], max: u64, trusted: &[PublicKey]) -> Result<Verified, BundleError> {
    match verify_any(bytes, max, trusted)? {
        Signed::Handler(v) => Ok(v),
        Signed::Config(_) => Err(BundleError::Manifest(
            "a config bundle (kind = \"config\"), not a handler".into(),
        )),
    }
}

/// A manifest's `kind` (`handler` when absent).
pub fn kind_of(text: &str) -> Result<Kind, BundleError> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        kind: Kind,
    }
    toml::from_str::<Head>(text)
        .map(|h| h.kind)
        .map_err(|e| BundleError::Manifest(e.to_string()))
}

/// A handler bundle's manifest (`kind = "handler"`, the default).
pub fn parse_manifest(text: &str) -> Result<Manifest, BundleError> {
    if kind_of(text)? == Kind::Config {
        return Err(BundleError::Manifest(
            "a config bundle (kind = \"config\"), not a handler".into(),
        ));
    }
    toml::from_str(text).map_err(|e| BundleError::Manifest(e.to_string()))
}

/// A config bundle's manifest (`kind = "config"`).
pub fn parse_config(text: &str) -> Result<ConfigManifest, BundleError> {
    let m: ConfigManifest =
        toml::from_str(text).map_err(|e| BundleError::Manifest(e.to_string()))?;
    match m.kind {
        Kind::Config => Ok(m),
        Kind::Handler => Err(BundleError::Manifest(
            "a handler manifest, not a config bundle".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = "name = \"t\"\nversion = 3\nsubscribe = [\"devices/#\"]\n";
    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    fn signed() -> (SigningKey, Vec<u8>) {
        let (key, _) = SigningKey::generate().unwrap();
        let b = build(MANIFEST, WASM, &key).unwrap();
        (key, b)
    }

    #[test]
    fn a_bundle_verifies_with_its_key_and_its_head_is_the_signed_message() {
        let (key, b) = signed();
        let v = verify(&b, MAX_BUNDLE_BYTES, &[key.public()]).unwrap();
        assert_eq!(v.manifest.name, "t");
        assert_eq!(v.manifest.version, 3);
        assert_eq!(v.wasm, WASM);
        assert_eq!(v.signer, key.public());
        // The signed bytes, exactly as DESIGN names them.
        let mut msg = b"tidepool-bundle-v1\0".to_vec();
        msg.extend((MANIFEST.len() as u32).to_be_bytes());
        msg.extend(MANIFEST.as_bytes());
        msg.extend((WASM.len() as u32).to_be_bytes());
        msg.extend(WASM);
        assert_eq!(frame(&b, MAX_BUNDLE_BYTES).unwrap().signed, &msg[..]);
        assert_eq!(b.len(), msg.len() + 96);
    }

    #[test]
    fn every_changed_byte_is_refused() {
        let (key, b) = signed();
        let trusted = [key.public()];
        for i in 0..b.len() {
            let mut t = b.clone();
            t[i] ^= 0x01;
            assert!(
                verify(&t, MAX_BUNDLE_BYTES, &trusted).is_err(),
                "byte {i} changed and still verified"
            );
        }
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let (key, b) = signed();
        let trusted = [key.public()];
        let v = |bytes: &[u8]| verify(bytes, MAX_BUNDLE_BYTES, &trusted).unwrap_err();
        // Unsigned: a bare manifest or module.
        assert_eq!(v(MANIFEST.as_bytes()), BundleError::NotABundle);
        assert_eq!(v(WASM), BundleError::NotABundle);
        // Truncated anywhere.
        for cut in [10, 25, MAGIC.len() + 4 + MANIFEST.len() + 2, b.len() - 1] {
            assert!(
                matches!(
                    v(&b[..cut]),
                    BundleError::Truncated(_) | BundleError::NotABundle
                ),
                "cut at {cut}: {:?}",
                v(&b[..cut])
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(v(&long), BundleError::TrailingBytes(1));
        // Another key: untrusted, named by its fingerprint.
        let (other, _) = SigningKey::generate().unwrap();
        let foreign = build(MANIFEST, WASM, &other).unwrap();
        assert_eq!(
            v(&foreign),
            BundleError::UntrustedKey(other.public().fingerprint())
        );
        // A trusted key put on another's signature.
        let mut swapped = foreign.clone();
        let at = swapped.len() - 96;
        swapped[at..at + 32].copy_from_slice(&key.public().0);
        assert_eq!(v(&swapped), BundleError::BadSignature);
        // Over the size cap: refused before anything is read.
        assert_eq!(
            verify(&b, 10, &trusted).unwrap_err(),
            BundleError::TooLarge {
                len: b.len() as u64,
                max: 10
            }
        );
        // A declared length past the end of the file.
        let mut lying = MAGIC.to_vec();
        lying.extend(u32::MAX.to_be_bytes());
        assert_eq!(v(&lying), BundleError::Truncated("the manifest"));
    }

    #[test]
    fn a_signed_manifest_of_an_unknown_kind_or_shape_is_refused_after_the_signature() {
        let (key, _) = SigningKey::generate().unwrap();
        let trusted = [key.public()];
        for (manifest, says) in [
            (format!("kind = \"sensor\"\n{MANIFEST}"), "sensor"),
            (
                format!("kind = \"config\"\n{MANIFEST}"),
                "carries no module",
            ),
            ("name = \"t\"\n".to_string(), "version"),
            (format!("{MANIFEST}colour = 1\n"), "colour"),
        ] {
            let b = build(&manifest, WASM, &key).unwrap();
            match verify(&b, MAX_BUNDLE_BYTES, &trusted).unwrap_err() {
                BundleError::Manifest(why) => assert!(why.contains(says), "{why}"),
                other => panic!("{manifest}: {other:?}"),
            }
        }
        let b = build(&format!("kind = \"handler\"\n{MANIFEST}"), WASM, &key).unwrap();
        assert!(verify(&b, MAX_BUNDLE_BYTES, &trusted).is_ok());
    }

    #[test]
    fn a_config_bundle_verifies_as_settings_and_never_as_a_handler() {
        let (key, _) = SigningKey::generate().unwrap();
        let trusted = [key.public()];
        let text = "kind = \"config\"\nversion = 2\n[acl]\nrevoked = [\"d9\"]\n";
        let b = build(text, b"", &key).unwrap();
        match verify_any(&b, MAX_BUNDLE_BYTES, &trusted).unwrap() {
            Signed::Config(c) => {
                assert_eq!(c.manifest.version, 2);
                assert_eq!(c.manifest.acl.revoked, vec!["d9".to_string()]);
                assert_eq!(c.manifest.acl.publish, None);
            }
            other => panic!("{other:?}"),
        }
        let why = verify(&b, MAX_BUNDLE_BYTES, &trusted).unwrap_err();
        assert!(why.to_string().contains("not a handler"), "{why}");
        assert!(parse_manifest(text).is_err());
        for (bad, says) in [
            (
                "kind = \"config\"\nversion = 2\n[acl]\ntiers = []\n".to_string(),
                "tiers",
            ),
            ("kind = \"config\"\n".to_string(), "version"),
            (format!("{text}[router]\nunrouted = \"drop\"\n"), "router"),
        ] {
            let b = build(&bad, b"", &key).unwrap();
            match verify_any(&b, MAX_BUNDLE_BYTES, &trusted).unwrap_err() {
                BundleError::Manifest(why) => assert!(why.contains(says), "{why}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn public_keys_read_back_as_written_and_bad_ones_are_refused() {
        let (key, der) = SigningKey::generate().unwrap();
        let text = key.public().to_string();
        assert!(text.starts_with("ed25519:"));
        assert_eq!(PublicKey::parse(&text).unwrap(), key.public());
        assert_eq!(
            PublicKey::parse(&format!(" {text}\n")).unwrap(),
            key.public()
        );
        assert_eq!(SigningKey::from_pkcs8(&der).unwrap().public(), key.public());
        assert_eq!(key.public().fingerprint().len(), 64);
        for bad in ["", "ed25519:", "ed25519:AAAA", "rsa:AAAA", &text[8..]] {
            assert!(PublicKey::parse(bad).is_err(), "{bad}");
        }
        assert!(SigningKey::from_pkcs8(b"not a key").is_err());
    }
}
