//! Certificates: the device CA, the operator CA, the server CA and the gateway's server
//! certificate, generated on first start under `<data-dir>/pki/`, and device certificates
//! issued from the device CA. All keys are ECDSA P-256.
//!
//! Every certificate is valid from 1970-01-01 (rcgen's default, 1975, would make a box or a
//! device whose clock has not been set since boot, with no real-time clock, refuse it); a
//! device certificate expires after the days it was issued for (`certs device --days`,
//! [`DEVICE_DAYS`] by default), an operator's within [`OPERATOR_MAX_DAYS`]. Revocation is a
//! deny-list in the config (`acl.revoked` for devices, `admin.revoked` for operators).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use crate::proto::topic::valid_device_id;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: not a usable PEM file: {msg}")]
    Pem { path: PathBuf, msg: String },
    #[error("device id `{0}` must match [A-Za-z0-9._-]{{1,64}} and not be `.` or `..`")]
    BadId(String),
    #[error("the clock reads {0} (before 2025): a certificate's expiry counts from now, so set the clock first (a device certificate issued now would have expired long ago once it is right)")]
    ClockUnset(String),
    #[error("device id `{0}` is reserved: `{0}.crt` would overwrite the CA certificate written beside it; choose another id")]
    ReservedId(String),
    #[error("no PKI in {0}: start the gateway once (`tidepool run`) to create it")]
    Missing(PathBuf),
    #[error("an operator certificate is valid {OPERATOR_MAX_DAYS} days at most, not {0}: issue a new one when it expires")]
    TooLong(u32),
    #[error("{path}: not a certificate signing request this can sign: {msg}")]
    Csr { path: PathBuf, msg: String },
    #[error(
        "{path}: its public key is not this box's ({key}): it was signed for another box's request"
    )]
    NotOurKey { path: PathBuf, key: PathBuf },
    #[error("pki.device_ca and pki.operator_ca name the same CA ({0}): every device would be an operator; give the fleet two CAs (`tidepool certs init` makes them)")]
    SameCa(PathBuf),
    #[error("this box serves a server certificate from another CA than its own (a fleet's, `certs install`): its devices and operators trust that CA, so issue with `--ca DIR` where the fleet's CAs are")]
    ServedByFleet,
    #[error("this box trusts a fleet's {what} ({path}, pki.{what} in the config) and holds no key for it: issue the certificate where the fleet's CAs are kept, with `--ca DIR`")]
    FleetCa { what: &'static str, path: PathBuf },
}

/// The file names of the PKI inside `<data-dir>/pki/`, and the fleet's CA certificates the
/// config names instead of the box's own (`[pki]`).
#[derive(Debug, Clone)]
pub struct PkiPaths {
    pub dir: PathBuf,
    /// `pki.device_ca`: devices are the fleet's (no device CA is generated on the box).
    pub fleet_device_ca: Option<PathBuf>,
    /// `pki.operator_ca`: operators are the fleet's.
    pub fleet_operator_ca: Option<PathBuf>,
}

impl PkiPaths {
    /// The box's own PKI only.
    pub fn new(data_dir: &Path) -> Self {
        PkiPaths {
            dir: data_dir.join("pki"),
            fleet_device_ca: None,
            fleet_operator_ca: None,
        }
    }

    /// A PKI kept in `dir` itself (a fleet's, on the operator's machine: `certs init`).
    pub fn at(dir: &Path) -> Self {
        PkiPaths {
            dir: dir.to_path_buf(),
            ..PkiPaths::new(Path::new(""))
        }
    }

    /// The PKI a config describes: the data dir's, with the fleet's CAs it names.
    pub fn of(cfg: &crate::config::Config) -> Self {
        let some = |p: &PathBuf| (!p.as_os_str().is_empty()).then(|| p.clone());
        PkiPaths {
            fleet_device_ca: some(&cfg.pki.device_ca),
            fleet_operator_ca: some(&cfg.pki.operator_ca),
            ..PkiPaths::new(&cfg.gateway.data_dir)
        }
    }

    /// The fleet's certificate standing in for the CA `name`, if the config names one.
    fn fleet(&self, name: &str) -> Option<(&'static str, &PathBuf)> {
        match name {
            DEVICE_CA => self.fleet_device_ca.as_ref().map(|p| ("device_ca", p)),
            OPERATOR_CA => self.fleet_operator_ca.as_ref().map(|p| ("operator_ca", p)),
            _ => None,
        }
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        match self.fleet(name) {
            Some((_, p)) => p.clone(),
            None => self.dir.join(format!("{name}.crt")),
        }
    }
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
}

/// The certificate authorities a gateway owns.
pub const DEVICE_CA: &str = "device-ca";
pub const OPERATOR_CA: &str = "operator-ca";
pub const SERVER_CA: &str = "server-ca";
pub const SERVER: &str = "server";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a whole file atomically (temp file, then rename), so readers never see half of it.
fn write_file(path: &Path, data: &str, mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    // Never through a link planted at the temp name (it could catch a private key).
    let mut f = crate::os::files::create_fresh(&tmp, mode).map_err(io(&tmp))?;
    f.write_all(data.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    // The rename is durable only once the directory is synced (a power cut could otherwise
    // leave the box without the key it just made, and a new CA at the next start).
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// The default gateway id: `tp-` and the first 8 bytes (hex) of the SHA-256 of the public key
/// (SubjectPublicKeyInfo) in the box's own server certificate. Unique per box (cloned boards
/// share host names, not keys), stable while the data dir is kept, whatever format the key
/// file is in.
pub fn box_id(data_dir: &Path) -> Result<String, PkiError> {
    let cp = PkiPaths::new(data_dir).cert(SERVER);
    let certs = read_certs(&cp)?;
    let spki = certs
        .first()
        .and_then(|der| x509_parser::parse_x509_certificate(der.as_ref()).ok())
        .map(|(_, c)| c.public_key().raw.to_vec())
        .ok_or_else(|| PkiError::Pem {
            path: cp.clone(),
            msg: "no readable certificate".into(),
        })?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &spki);
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("tp-{hex}"))
}

fn random_serial() -> SerialNumber {
    // A positive 63-bit serial: unique per issue even for the same key.
    SerialNumber::from((fastrand::u64(..) >> 1).max(1))
}

fn new_ca(cn: &str) -> Result<(String, KeyPair), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.not_before = valid_from();
    // A name of its own (a box's CA and a fleet's are told apart by their names: an issuer
    // is matched to its CA by name).
    p.distinguished_name.push(
        DnType::CommonName,
        format!("{cn} {:08x}", fastrand::u32(..)),
    );
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.serial_number = Some(random_serial());
    Ok((p.self_signed(&key)?.pem(), key))
}

fn load_ca(paths: &PkiPaths, name: &str) -> Result<(Certificate, KeyPair), PkiError> {
    if let Some((what, path)) = paths.fleet(name) {
        return Err(PkiError::FleetCa {
            what,
            path: path.clone(),
        });
    }
    let (cp, kp) = (paths.cert(name), paths.key(name));
    if !cp.exists() {
        return Err(PkiError::Missing(paths.dir.clone()));
    }
    let crt = fs::read_to_string(&cp).map_err(io(&cp))?;
    let key = read_key_pair(&kp)?;
    let params = CertificateParams::from_ca_cert_pem(&crt).map_err(|e| PkiError::Pem {
        path: cp.clone(),
        msg: e.to_string(),
    })?;
    Ok((params.self_signed(&key)?, key))
}

/// 2025-01-01: a clock before it was never set (issuing refuses to count an expiry from it).
const CLOCK_FLOOR_S: i64 = 1_735_689_600;

/// Days a device certificate is valid by default (ten years: there is no renewal flow yet; a
/// stolen device is revoked with `acl.revoked`).
pub const DEVICE_DAYS: u32 = 3650;

/// The start of every certificate's validity: the Unix epoch, which a clock that was never
/// set still reads past.
fn valid_from() -> time::OffsetDateTime {
    time::OffsetDateTime::UNIX_EPOCH
}

fn issue_leaf(
    ca: &(Certificate, KeyPair),
    cn: &str,
    sans: Vec<String>,
    eku: ExtendedKeyUsagePurpose,
    days: Option<u32>,
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(sans)?;
    p.not_before = valid_from();
    if let Some(days) = days {
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days.into());
    }
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![eku];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.serial_number = Some(random_serial());
    let cert = p.signed_by(&key, &ca.0, &ca.1)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Creates whatever part of the PKI is missing. Returns true when something was created.
/// A CA the config names as the fleet's is never generated (its certificate must be readable).
pub fn ensure(paths: &PkiPaths, server_names: &[String]) -> Result<bool, PkiError> {
    let cas = ensure_cas(paths)?;
    Ok(ensure_server(paths, server_names)? || cas)
}

/// Creates whichever of the three CAs is missing in `paths.dir` (a fleet's PKI: `certs init`,
/// or a box's own); returns true when one was created.
pub fn ensure_cas(paths: &PkiPaths) -> Result<bool, PkiError> {
    fs::create_dir_all(&paths.dir).map_err(io(&paths.dir))?;
    let mut created = false;
    for (name, cn) in [
        (DEVICE_CA, "Tidepool device CA"),
        (OPERATOR_CA, "Tidepool operator CA"),
        (SERVER_CA, "Tidepool server CA"),
    ] {
        if let Some((_, fleet)) = paths.fleet(name) {
            read_certs(fleet)?;
            continue;
        }
        if !paths.cert(name).exists() {
            let (crt, key) = new_ca(cn)?;
            write_file(&paths.key(name), &key.serialize_pem(), 0o600)?;
            write_file(&paths.cert(name), &crt, 0o644)?;
            created = true;
        }
    }
    // One CA for both roles would make every device an operator.
    let (d, o) = (paths.cert(DEVICE_CA), paths.cert(OPERATOR_CA));
    if read_certs(&d)?.first() == read_certs(&o)?.first() {
        return Err(PkiError::SameCa(d));
    }
    Ok(created)
}

/// The box's server certificate, made from its server CA when missing.
fn ensure_server(paths: &PkiPaths, server_names: &[String]) -> Result<bool, PkiError> {
    let mut created = false;
    if !paths.cert(SERVER).exists() {
        let ca = load_ca(paths, SERVER_CA)?;
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        sans.extend(server_names.iter().cloned());
        let (crt, key) = issue_leaf(
            &ca,
            "tidepool gateway",
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            None,
        )?;
        write_file(&paths.key(SERVER), &key, 0o600)?;
        write_file(&paths.cert(SERVER), &crt, 0o644)?;
        created = true;
    }
    Ok(created)
}

/// Issues a device certificate: writes `ID.crt`, `ID.key` and the gateway's `ca.crt` to `out`.
pub fn issue_device(data_dir: &Path, id: &str, out: &Path) -> Result<[PathBuf; 3], PkiError> {
    issue_device_for(&PkiPaths::new(data_dir), id, out, DEVICE_DAYS)
}

/// Issues a device certificate valid for `days` (from the Unix epoch, so a box with no clock
/// accepts it, until now + `days`); writes `<out>/<id>.crt`, `<out>/<id>.key` and `<out>/ca.crt`.
pub fn issue_device_for(
    paths: &PkiPaths,
    id: &str,
    out: &Path,
    days: u32,
) -> Result<[PathBuf; 3], PkiError> {
    issue_client(paths, DEVICE_CA, id, out, days)
}

/// The longest an operator certificate is valid: a lost laptop's key dies on its own.
pub const OPERATOR_MAX_DAYS: u32 = 90;

/// Issues an operator certificate for the admin channel, from the operator CA, valid for
/// `days` (at most [`OPERATOR_MAX_DAYS`]); writes `<out>/<name>.crt`, `<out>/<name>.key` and
/// `<out>/ca.crt`. The name is its CN, which the gateway logs with what the operator does.
pub fn issue_operator(
    paths: &PkiPaths,
    name: &str,
    out: &Path,
    days: u32,
) -> Result<[PathBuf; 3], PkiError> {
    if days > OPERATOR_MAX_DAYS {
        return Err(PkiError::TooLong(days));
    }
    issue_client(paths, OPERATOR_CA, name, out, days)
}

/// A client certificate (CN `id`, clientAuth) from the CA `ca`, and the server CA beside it.
fn issue_client(
    paths: &PkiPaths,
    ca: &str,
    id: &str,
    out: &Path,
    days: u32,
) -> Result<[PathBuf; 3], PkiError> {
    check_client_id(id)?;
    // The expiry counts from now: a clock that was never set would issue a dead certificate.
    clock_set()?;
    let ca = load_ca(paths, ca)?;
    served_by_own_ca(paths)?;
    let (crt, key) = issue_leaf(
        &ca,
        id,
        vec![],
        ExtendedKeyUsagePurpose::ClientAuth,
        Some(days),
    )?;
    fs::create_dir_all(out).map_err(io(out))?;
    let files = [
        out.join(format!("{id}.crt")),
        out.join(format!("{id}.key")),
        out.join("ca.crt"),
    ];
    write_file(&files[0], &crt, 0o644)?;
    write_file(&files[1], &key, 0o600)?;
    let server_ca = paths.cert(SERVER_CA);
    let ca_pem = fs::read_to_string(&server_ca).map_err(io(&server_ca))?;
    write_file(&files[2], &ca_pem, 0o644)?;
    Ok(files)
}

/// A certificate signing request for the box's own server key (made if missing; it never
/// leaves the box): CN "tidepool gateway", the names localhost, 127.0.0.1 and
/// `server_names`. Signed by a fleet's server CA ([`sign_server_request`]) and installed
/// ([`install_server_cert`]), it lets every device of the fleet trust any box of it.
pub fn server_request(paths: &PkiPaths, server_names: &[String]) -> Result<String, PkiError> {
    ensure(paths, server_names)?;
    let key = read_key_pair(&paths.key(SERVER))?;
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    sans.extend(server_names.iter().cloned());
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name
        .push(DnType::CommonName, "tidepool gateway");
    Ok(p.serialize_request(&key)?.pem()?)
}

/// Reads a CSR (its signature checked: whoever sent it holds the key).
fn read_request(path: &Path) -> Result<rcgen::CertificateSigningRequestParams, PkiError> {
    let pem = fs::read_to_string(path).map_err(io(path))?;
    rcgen::CertificateSigningRequestParams::from_pem(&pem).map_err(|e| PkiError::Csr {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Signs a box's server CSR with the server CA in `ca` (a fleet's PKI, `certs init`): the
/// names it asks for (DNS names and IP addresses only), serverAuth, valid from 1970 (a box
/// with no clock) for `days` (`None`: no set end). Returns the certificate (PEM).
pub fn sign_server_request(
    ca: &PkiPaths,
    csr: &Path,
    days: Option<u32>,
) -> Result<String, PkiError> {
    let mut req = read_request(csr)?;
    let bad = |msg: String| PkiError::Csr {
        path: csr.to_path_buf(),
        msg,
    };
    if req.params.subject_alt_names.is_empty() {
        return Err(bad("it names no host (subject alternative names)".into()));
    }
    for san in &req.params.subject_alt_names {
        if !matches!(
            san,
            rcgen::SanType::DnsName(_) | rcgen::SanType::IpAddress(_)
        ) {
            return Err(bad(format!("{san:?}: only DNS names and IP addresses")));
        }
    }
    if days.is_some() {
        clock_set()?;
    }
    let ca = load_ca(ca, SERVER_CA)?;
    let p = &mut req.params;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "tidepool gateway");
    shape_leaf(p, ExtendedKeyUsagePurpose::ServerAuth, days);
    Ok(req.signed_by(&ca.0, &ca.1)?.pem())
}

/// Signs a device's own CSR with the device CA of `paths` (a box's, or a fleet's): CN `id`
/// whatever the request says, no other names, clientAuth, valid from 1970 for `days`. Writes
/// `<out>/<id>.crt` and `<out>/ca.crt` (the server CA the device trusts); the device keeps
/// its key.
pub fn sign_device_request(
    paths: &PkiPaths,
    id: &str,
    csr: &Path,
    out: &Path,
    days: u32,
) -> Result<[PathBuf; 2], PkiError> {
    check_client_id(id)?;
    let mut req = read_request(csr)?;
    clock_set()?;
    let ca = load_ca(paths, DEVICE_CA)?;
    served_by_own_ca(paths)?;
    let p = &mut req.params;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, id);
    p.subject_alt_names.clear();
    shape_leaf(p, ExtendedKeyUsagePurpose::ClientAuth, Some(days));
    let crt = req.signed_by(&ca.0, &ca.1)?.pem();
    fs::create_dir_all(out).map_err(io(out))?;
    let files = [out.join(format!("{id}.crt")), out.join("ca.crt")];
    write_file(&files[0], &crt, 0o644)?;
    let server_ca = paths.cert(SERVER_CA);
    let ca_pem = fs::read_to_string(&server_ca).map_err(io(&server_ca))?;
    write_file(&files[1], &ca_pem, 0o644)?;
    Ok(files)
}

/// Installs a server certificate signed for this box's key (`certs install`), replacing the
/// one the box made itself; the gateway serves it from its next start.
pub fn install_server_cert(paths: &PkiPaths, crt: &Path) -> Result<(), PkiError> {
    let certs = read_certs(crt)?;
    let kp = paths.key(SERVER);
    let key = read_key_pair(&kp)?;
    let spki = x509_parser::parse_x509_certificate(certs[0].as_ref())
        .map(|(_, c)| c.public_key().raw.to_vec())
        .map_err(|e| PkiError::Pem {
            path: crt.to_path_buf(),
            msg: e.to_string(),
        })?;
    if spki != key.public_key_der() {
        return Err(PkiError::NotOurKey {
            path: crt.to_path_buf(),
            key: kp,
        });
    }
    let pem = fs::read_to_string(crt).map_err(io(crt))?;
    write_file(&paths.cert(SERVER), &pem, 0o644)
}

/// Refuses to hand out `paths`' server CA as a client's `ca.crt` when the box serves a
/// certificate from another CA (a fleet's, installed with `certs install`): the client would
/// not trust the box. A folder of a fleet's CAs (no server certificate in it) passes.
fn served_by_own_ca(paths: &PkiPaths) -> Result<(), PkiError> {
    let served = paths.cert(SERVER);
    if !served.exists() {
        return Ok(());
    }
    let name = |p: &Path, issuer: bool| -> Result<Vec<u8>, PkiError> {
        let der = read_certs(p)?;
        let (_, c) =
            x509_parser::parse_x509_certificate(der[0].as_ref()).map_err(|e| PkiError::Pem {
                path: p.to_path_buf(),
                msg: e.to_string(),
            })?;
        Ok(match issuer {
            true => c.issuer().as_raw().to_vec(),
            false => c.subject().as_raw().to_vec(),
        })
    };
    if name(&served, true)? != name(&paths.cert(SERVER_CA), false)? {
        return Err(PkiError::ServedByFleet);
    }
    Ok(())
}

/// A private key file (PEM) as rcgen signs with it.
fn read_key_pair(path: &Path) -> Result<KeyPair, PkiError> {
    let pem = fs::read_to_string(path).map_err(io(path))?;
    KeyPair::from_pem(&pem).map_err(|e| PkiError::Pem {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// A leaf's usages and validity (from 1970, for `days` from now when given), a fresh serial.
fn shape_leaf(p: &mut CertificateParams, eku: ExtendedKeyUsagePurpose, days: Option<u32>) {
    p.is_ca = IsCa::ExplicitNoCa;
    p.not_before = valid_from();
    p.not_after = match days {
        Some(d) => time::OffsetDateTime::now_utc() + time::Duration::days(d.into()),
        None => CertificateParams::default().not_after,
    };
    p.extended_key_usages = vec![eku];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.serial_number = Some(random_serial());
}

/// An expiry counted from now needs a clock that was set.
fn clock_set() -> Result<(), PkiError> {
    let now = time::OffsetDateTime::now_utc();
    if now.unix_timestamp() < CLOCK_FLOOR_S {
        return Err(PkiError::ClockUnset(now.date().to_string()));
    }
    Ok(())
}

/// A client certificate's id: a valid device id, and not `ca` (its file would overwrite the
/// CA certificate written beside it, whatever the case on a FAT stick).
fn check_client_id(id: &str) -> Result<(), PkiError> {
    if !valid_device_id(id) {
        return Err(PkiError::BadId(id.to_string()));
    }
    if id.eq_ignore_ascii_case("ca") {
        return Err(PkiError::ReservedId(id.to_string()));
    }
    Ok(())
}

/// The trust anchors of a PEM file of CA certificates (one, or a bundle such as
/// `/etc/ssl/certs/ca-certificates.crt`, whose certificates rustls cannot use as anchors
/// are left out); an error when none is usable.
pub fn root_store(path: &Path) -> Result<rustls::RootCertStore, PkiError> {
    let mut store = rustls::RootCertStore::empty();
    let (added, ignored) = store.add_parsable_certificates(read_certs(path)?);
    if added == 0 {
        return Err(PkiError::Pem {
            path: path.to_path_buf(),
            msg: format!("none of its {ignored} certificate(s) is a usable CA certificate"),
        });
    }
    Ok(store)
}

/// Reads every certificate of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| PkiError::Pem {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            path: path.to_path_buf(),
            msg: "no certificate".into(),
        });
    }
    Ok(certs)
}

/// Reads a private key (PKCS#8 or SEC1 PEM).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PkiError::Pem {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// The end of a DER certificate's validity, in Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next()?.as_str().ok()?.to_string();
    // Two CNs name no one: which one a peer reads would decide who the device is.
    if cns.next().is_some() {
        return None;
    }
    Some(cn)
}

/// A certificate's issuer and subject, as `CN=…` (the common names only: every name this
/// PKI issues has one, and naming the other attributes would link x509-parser's table of
/// every OID's name into the binary), for a log line.
pub fn issuer_and_subject(der: &[u8]) -> Option<(String, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = |name: &x509_parser::x509::X509Name<'_>| {
        let cns: Vec<&str> = name
            .iter_common_name()
            .filter_map(|a| a.as_str().ok())
            .collect();
        format!("CN={}", cns.join(","))
    };
    Some((cn(cert.issuer()), cn(cert.subject())))
}

/// A certificate's serial as `acl.revoked` names it: lowercase hex, no leading zeros.
pub fn serial_hex(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(normalize_serial(&hex(cert.raw_serial())))
}

/// `0A:1b:00` or `00a1b` as `a1b00`/`a1b`: lowercase hex digits without separators and
/// leading zeros (`0` for zero).
pub fn normalize_serial(s: &str) -> String {
    let digits: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    match digits.trim_start_matches('0') {
        "" => "0".into(),
        d => d.to_string(),
    }
}

/// The deny-list (`acl.revoked`): device ids, and certificate serials as `serial:<hex>`. A
/// device whose id or certificate serial is on it is closed with `revoked` (code 6), at
/// connect and, after a reload, at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revoked {
    ids: std::collections::HashSet<String>,
    serials: std::collections::HashSet<String>,
}

impl Revoked {
    /// Parses `acl.revoked`; an entry that is neither a device id nor `serial:<hex>` is an
    /// error naming it.
    pub fn parse(entries: &[String]) -> Result<Revoked, String> {
        let mut r = Revoked::default();
        for e in entries {
            match e.strip_prefix("serial:") {
                Some(s)
                    if s.chars().any(|c| c.is_ascii_hexdigit())
                        && s.chars().all(|c| c.is_ascii_hexdigit() || c == ':') =>
                {
                    r.serials.insert(normalize_serial(s));
                }
                Some(_) => return Err(format!("acl.revoked: `{e}` is not serial:<hex digits>")),
                None if valid_device_id(e) => {
                    r.ids.insert(e.clone());
                }
                None => {
                    return Err(format!(
                        "acl.revoked: `{e}` is neither a device id nor serial:<hex>"
                    ))
                }
            }
        }
        Ok(r)
    }

    /// Whether the device `id` with the certificate serial `serial` ([`serial_hex`]) is denied.
    pub fn denies(&self, id: &str, serial: &str) -> bool {
        self.ids.contains(id) || self.serials.contains(serial)
    }

    pub fn len(&self) -> usize {
        self.ids.len() + self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ca_for_devices_and_operators_is_refused() {
        let fleet = tempfile::tempdir().unwrap();
        ensure_cas(&PkiPaths::at(fleet.path())).unwrap();
        let box_dir = tempfile::tempdir().unwrap();
        let ca = fleet.path().join("device-ca.crt");
        let paths = PkiPaths {
            fleet_device_ca: Some(ca.clone()),
            fleet_operator_ca: Some(ca),
            ..PkiPaths::new(box_dir.path())
        };
        assert!(matches!(ensure(&paths, &[]), Err(PkiError::SameCa(_))));
        let two = PkiPaths {
            fleet_operator_ca: Some(fleet.path().join("operator-ca.crt")),
            ..paths
        };
        ensure(&two, &[]).unwrap();
    }

    #[test]
    fn creates_once_and_issues_device_certs_with_the_id_as_cn() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure(&PkiPaths::new(dir.path()), &["gw.example".into()]).unwrap());
        assert!(!ensure(&PkiPaths::new(dir.path()), &[]).unwrap());
        let out = dir.path().join("out");
        let files = issue_device(dir.path(), "dev-1", &out).unwrap();
        let cert = &read_certs(&files[0]).unwrap()[0];
        assert_eq!(common_name(cert).as_deref(), Some("dev-1"));
        read_key(&files[1]).unwrap();
        let mode = std::fs::metadata(&files[1]).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(matches!(
            issue_device(dir.path(), "bad id", &out),
            Err(PkiError::BadId(_))
        ));
    }

    /// The findings: device certificates never expired (rcgen's 1975–4096), and a box whose
    /// clock reads 1970 refused every device (not before 1975).
    #[test]
    fn a_device_certificate_is_valid_from_the_epoch_for_its_days() {
        let dir = tempfile::tempdir().unwrap();
        ensure(&PkiPaths::new(dir.path()), &[]).unwrap();
        let files = issue_device_for(
            &PkiPaths::new(dir.path()),
            "d1",
            &dir.path().join("out"),
            30,
        )
        .unwrap();
        for f in [&files[0], &files[2]] {
            let der = read_certs(f).unwrap().remove(0);
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert_eq!(cert.validity().not_before.timestamp(), 0, "{}", f.display());
        }
        let der = read_certs(&files[0]).unwrap().remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let left = cert.validity().not_after.timestamp() - crate::clock::now_ms() as i64 / 1000;
        assert!((29 * 86_400..=30 * 86_400).contains(&left), "{left} s left");
        assert!(serial_hex(&der).is_some_and(|s| s != "0"));
    }

    #[test]
    fn the_deny_list_takes_ids_and_serials_and_names_a_bad_entry() {
        let r = Revoked::parse(&["d1".into(), "serial:00:0A:bc".into()]).unwrap();
        assert!(r.denies("d1", "1"));
        assert!(r.denies("d2", "abc"));
        assert!(!r.denies("d2", "abd"));
        for bad in ["a b", "serial:", "serial:xyz", ".."] {
            let e = Revoked::parse(&[bad.to_string()]).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    /// The finding: `certs device ca` overwrote `ca.crt`; `..` was accepted.
    #[test]
    fn ids_that_would_overwrite_a_file_or_climb_a_path_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        ensure(&PkiPaths::new(dir.path()), &[]).unwrap();
        let out = dir.path().join("out");
        for id in [".", ".."] {
            assert!(matches!(
                issue_device(dir.path(), id, &out),
                Err(PkiError::BadId(_))
            ));
        }
        assert!(matches!(
            issue_device(dir.path(), "ca", &out),
            Err(PkiError::ReservedId(_))
        ));
        assert!(matches!(
            issue_device(dir.path(), "CA", &out),
            Err(PkiError::ReservedId(_))
        ));
        assert!(!out.join("ca.crt").exists());
    }

    /// The finding: the temp file was opened without exclusive create, so a link planted at
    /// its name in a writable `--out` received the private key.
    #[test]
    fn a_link_planted_at_the_temp_name_does_not_receive_the_key() {
        let dir = tempfile::tempdir().unwrap();
        ensure(&PkiPaths::new(dir.path()), &[]).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let stolen = dir.path().join("stolen");
        let tmp = out.join(format!("dev-1.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&stolen, &tmp).unwrap();
        let files = issue_device(dir.path(), "dev-1", &out).unwrap();
        assert!(!stolen.exists(), "the key went through the planted link");
        read_key(&files[1]).unwrap();
    }

    /// The finding: a certificate with two CNs authenticated as the first.
    #[test]
    fn a_certificate_with_two_common_names_names_no_one() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "dev-1");
        // The CN's OID again, as a second attribute.
        p.distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 3]), "dev-2");
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()), None);
    }
}
