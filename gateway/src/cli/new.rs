//! `tidepool new` (a handler crate anywhere, from a template: the examples of `modules/`, or an
//! empty one) and `tidepool build` (its release `.wasm`, checked as a gateway would load it,
//! then run on its sample events through `invoke`).
//!
//! The crate depends on the SDK of a Tidepool checkout by path (no network needed, and its
//! `Cargo.lock` is the checkout's, so the versions are the ones already fetched). Its
//! `build.rs` sets the module's stack for the wasm target only (a `RUSTFLAGS` in the
//! environment cannot drop it, as it would a `.cargo/config.toml` flag), and nothing sets the
//! target for the whole crate, so `cargo test` runs the handler's pure logic on the host.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

/// Where the SDK was when this binary was built (a checkout's `modules/sdk`).
const BUILT_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../modules/sdk");

const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// Make a handler crate from a template: Cargo.toml, build.rs, .cargo/config.toml, the
/// handler's source and tests, its manifest (NAME.toml), sample events (events.jsonl) and a
/// README.
///
/// Then, in it: `cargo test` (the tests, on this machine), `tidepool build` (the .wasm, its
/// size, and its fuel on the sample events), and a `[[handler]]` entry in a gateway's config
/// (the README says which lines).
#[derive(clap::Args)]
pub struct NewArgs {
    /// The handler's name: also the crate's and the manifest's ([a-z][a-z0-9_-]{0,63}).
    name: String,
    /// What to start from: `threshold` (an alarm with hysteresis), `window` (per-minute
    /// statistics on a timer, typed JSON with serde), `deadband` (forward only a change), or
    /// `empty` (forwards readings above 30; the smallest module).
    #[arg(long, value_name = "NAME", default_value = "empty")]
    template: Template,
    /// Where to make the crate (default: ./NAME). It must not exist, or be empty.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The SDK to depend on: a Tidepool checkout's `modules/sdk` (default: the checkout this
    /// binary was built from, if it is still there; a binary built elsewhere needs this).
    #[arg(long, value_name = "DIR")]
    sdk: Option<PathBuf>,
}

/// Build a handler crate (`tidepool new`) into its release .wasm, check it as a gateway would
/// load it, and run it on its sample events (`invoke`).
///
/// Installs the wasm32-unknown-unknown target through rustup when it is missing. Prints the
/// module's path and size, the toolchain that built it, and each sample event's fuel.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// The crate (default: the current directory).
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// The handler's manifest (default: DIR/NAME.toml, NAME being the crate's).
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Events to run it on (default: DIR/events.jsonl, when there).
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Template {
    Threshold,
    Window,
    Deadband,
    Empty,
}

/// A template's files: (path in the crate, text), its manifest's text, and whether it uses
/// the SDK's `serde` feature.
struct Files {
    sources: Vec<(&'static str, &'static str)>,
    manifest: &'static str,
    serde: bool,
}

impl Template {
    fn files(self) -> Files {
        macro_rules! example {
            ($name:literal, [$($file:literal),*], $serde:expr) => {
                Files {
                    sources: vec![$(
                        (concat!("src/", $file), include_str!(concat!("../../../modules/examples/", $name, "/src/", $file))),
                    )*],
                    manifest: include_str!(concat!("../../../modules/examples/", $name, "/", $name, ".toml")),
                    serde: $serde,
                }
            };
        }
        match self {
            Template::Threshold => example!("threshold", ["lib.rs", "alarm.rs"], false),
            Template::Window => example!("window", ["lib.rs", "window.rs"], true),
            Template::Deadband => example!("deadband", ["lib.rs", "band.rs"], false),
            Template::Empty => Files {
                sources: vec![("src/lib.rs", EMPTY_LIB)],
                manifest: EMPTY_MANIFEST,
                serde: false,
            },
        }
    }

    /// The template's handler name, as its manifest says it.
    fn manifest_name(self) -> &'static str {
        match self {
            Template::Threshold => "threshold",
            Template::Window => "window",
            Template::Deadband => "deadband",
            Template::Empty => "NAME",
        }
    }
}

const EMPTY_LIB: &str = r#"//! A Tidepool handler: `on_event` runs once per event on the topics its manifest subscribes
//! to, and what it forwards goes to the cloud. See docs/handlers.md in the Tidepool checkout.
#![cfg_attr(all(target_arch = "wasm32", not(test)), no_std)]

extern crate alloc;

use tidepool_sdk::{forward, Class, Error, Event};

tidepool_sdk::handler!(on_event);

fn on_event(ev: &Event) -> Result<(), Error> {
    if worth_sending(ev.number("v")) {
        forward(ev.topic, ev.payload, Class::Normal)?;
    }
    Ok(())
}

/// The decision, kept apart from the host calls so that `cargo test` runs it on this machine
/// (the host calls exist only inside the gateway).
fn worth_sending(reading: Option<f64>) -> bool {
    reading.is_some_and(|v| v > 30.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_readings_above_30_are_sent() {
        assert!(worth_sending(Some(30.5)));
        assert!(!worth_sending(Some(30.0)));
        assert!(!worth_sending(None));
    }
}
"#;

const EMPTY_MANIFEST: &str = r#"name = "NAME"
version = 1
subscribe = ["devices/+/temp"]
[limits]
fuel_per_event = 100000
memory_pages = 4
"#;

/// Readings around a threshold of 30, and one that is not a number (a failed event).
const EVENTS: &str = r#"{"topic":"devices/d1/temp","device":"d1","payload":"{\"v\": 21.5}"}
{"topic":"devices/d1/temp","device":"d1","payload":"{\"v\": 31.2}"}
{"topic":"devices/d1/temp","device":"d1","payload":"{\"v\": 32}"}
{"topic":"devices/d1/temp","device":"d1","payload":"{\"v\": 29.5}"}
{"topic":"devices/d1/temp","device":"d1","payload":"{\"v\": 28.9}"}
{"topic":"devices/d1/temp","device":"d1","payload":"{\"v\": \"hot\"}"}
"#;

const CARGO_CONFIG: &str = r#"[alias]
# `cargo wasm` builds the module, as `tidepool build` does. No target is set for the whole
# crate: `cargo test` runs on this machine.
wasm = "build --release --target wasm32-unknown-unknown"
"#;

const BUILD_RS: &str = r#"//! The module's stack: Rust reserves 1 MiB by default (18 pages of initial memory), and a
//! handler gets a few pages (a bigger module does not load: `memory_pages is 4`). For the
//! wasm build only.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo:rustc-link-arg-cdylib=-zstack-size=65536");
    }
}
"#;

/// The checkout's lock file: a new crate resolves to the versions already fetched.
const CARGO_LOCK: &str = include_str!("../../../modules/Cargo.lock");

/// Names cargo refuses for a crate, or that clash with the crates it depends on.
const TAKEN: &[&str] = &[
    "test",
    "self",
    "super",
    "crate",
    "fn",
    "mod",
    "core",
    "std",
    "alloc",
    "serde",
    "tidepool",
    "tidepool-sdk",
    "tidepool_sdk",
    "tidepool-abi",
    "tidepool_abi",
];

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && !TAKEN.contains(&name)
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// The module's file name for crate `name`.
fn wasm_file(name: &str) -> String {
    format!("{}.wasm", name.replace('-', "_"))
}

fn cargo_toml(name: &str, sdk: &Path, serde: bool) -> String {
    let sdk = toml::Value::String(sdk.display().to_string());
    let (features, serde_dep) = match serde {
        true => (
            ", features = [\"serde\"]",
            "# The SDK's typed JSON needs serde's derive in the crate itself.\nserde = { version = \"1.0.200\", default-features = false, features = [\"alloc\", \"derive\"] }\n",
        ),
        false => ("", ""),
    };
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"

# A .wasm module: `tidepool build` (or `cargo wasm`) makes target/wasm32-unknown-unknown/release/{wasm}.
[lib]
crate-type = ["cdylib"]

[dependencies]
# The SDK of a Tidepool checkout, by path: builds offline (`tidepool new --sdk DIR` picks another).
tidepool-sdk = {{ path = {sdk}{features} }}
{serde_dep}
# Small modules: the gateway interprets them and caps their memory.
[profile.release]
opt-level = "z"
lto = true
codegen-units = 1
panic = "abort"
strip = true

# A workspace of its own, wherever it is made.
[workspace]
"#,
        wasm = wasm_file(name),
    )
}

fn readme(name: &str) -> String {
    let wasm = wasm_file(name);
    format!(
        r#"# {name}

A Tidepool handler (`tidepool new`). In this folder:

    cargo test          # the handler's logic, on this machine
    tidepool build      # the .wasm, checked, and run on events.jsonl

On the box, copy the module (`tidepool build` prints where it is) and `{name}.toml` beside the
gateway's config, e.g. into /etc/tidepool/handlers/, and add to that config (paths in a config
file are relative to the file):

    [[handler]]
    wasm = "handlers/{wasm}"
    manifest = "handlers/{name}.toml"

then `systemctl reload tidepool` puts it in force. The SDK and the ABI are described in
docs/handlers.md of the Tidepool checkout.
"#
    )
}

pub fn new(a: NewArgs) -> anyhow::Result<ExitCode> {
    if !valid_name(&a.name) {
        bail!(
            "`{}` is not a handler name: a lowercase letter, then lowercase letters, digits, `-` or `_`, 64 at most, and not a name cargo or the SDK takes (it names the crate, the module and the state)",
            a.name
        );
    }
    let sdk = a.sdk.unwrap_or_else(|| PathBuf::from(BUILT_SDK));
    let is_sdk = |p: &Path| {
        std::fs::read_to_string(p.join("Cargo.toml"))
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .and_then(|t| Some(t.get("package")?.get("name")?.as_str()? == "tidepool-sdk"))
            .unwrap_or(false)
    };
    let sdk = std::fs::canonicalize(&sdk)
        .ok()
        .filter(|p| is_sdk(p))
        .with_context(|| {
            format!(
                "no SDK at {} (its Cargo.toml names the package tidepool-sdk): give a Tidepool checkout's modules/sdk with --sdk DIR",
                sdk.display()
            )
        })?;
    let dir = a.dir.unwrap_or_else(|| PathBuf::from(&a.name));
    if dir.exists() && !dir.is_dir() {
        bail!(
            "{} exists and is not a folder: nothing written",
            dir.display()
        );
    }
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!("{} exists and is not empty: nothing written", dir.display());
    }
    let files = a.template.files();
    let manifest = files.manifest.replacen(
        &format!("name = \"{}\"", a.template.manifest_name()),
        &format!("name = \"{}\"", a.name),
        1,
    );
    let write = |path: &str, text: &str| -> anyhow::Result<()> {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    write("Cargo.toml", &cargo_toml(&a.name, &sdk, files.serde))?;
    write("Cargo.lock", CARGO_LOCK)?;
    write(".cargo/config.toml", CARGO_CONFIG)?;
    write("build.rs", BUILD_RS)?;
    for (path, text) in &files.sources {
        write(path, text)?;
    }
    write(&format!("{}.toml", a.name), &manifest)?;
    write("events.jsonl", EVENTS)?;
    write("README.md", &readme(&a.name))?;
    write(".gitignore", "/target\n")?;
    println!(
        "made {} (handler `{}`, SDK {})",
        dir.display(),
        a.name,
        sdk.display()
    );
    println!("next: cd {} && cargo test && tidepool build", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Installs the wasm target through rustup when it is missing, for the toolchain the crate in
/// `dir` builds with (nothing when rustup is not there: cargo then says what is missing).
fn ensure_wasm_target(dir: &Path) -> anyhow::Result<()> {
    let Ok(out) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(dir)
        .output()
    else {
        return Ok(());
    };
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == WASM_TARGET)
    {
        return Ok(());
    }
    eprintln!("installing the {WASM_TARGET} target (rustup target add {WASM_TARGET})");
    let added = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .current_dir(dir)
        .status()?;
    if !added.success() {
        bail!("`rustup target add {WASM_TARGET}` failed");
    }
    Ok(())
}

pub fn build(a: BuildArgs) -> anyhow::Result<ExitCode> {
    let cargo_toml = a.dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&cargo_toml).with_context(|| {
        format!(
            "{}: not a handler crate (`tidepool new NAME` makes one)",
            a.dir.display()
        )
    })?;
    let package: toml::Table = toml::from_str(&text)
        .with_context(|| format!("{}: not valid TOML", cargo_toml.display()))?;
    let Some(name) = package
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
    else {
        bail!("{}: no [package] name", cargo_toml.display());
    };
    ensure_wasm_target(&a.dir)?;
    // From the crate's folder: cargo reads .cargo/config.toml from the working directory.
    // Where the module lands is cargo's to say (target dirs, workspaces, [lib] names).
    let mut cargo = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--target",
            WASM_TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(&a.dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo")?;
    let mut wasm = None;
    if let Some(out) = cargo.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            wasm = wasm.or_else(|| module_of(&line));
        }
    }
    if !cargo.wait()?.success() {
        bail!("cargo build failed (above): nothing to check");
    }
    let Some(wasm) = wasm else {
        bail!("cargo built no .wasm for `{name}`: is its [lib] crate-type [\"cdylib\"]?");
    };
    let bytes = std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?;
    let manifest_path = a
        .manifest
        .unwrap_or_else(|| a.dir.join(format!("{name}.toml")));
    // Checked as a gateway with the default caps loads it: the manifest, then the module.
    let manifest = tidepool::sandbox::Manifest::load(&manifest_path)?;
    manifest.check(&tidepool::config::Config::defaults().limits)?;
    tidepool::sandbox::compile(&tidepool::sandbox::Runtime::default(), &bytes, &manifest)?;
    let rustc = Command::new("rustc")
        .arg("-V")
        .current_dir(&a.dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "{}: {} bytes ({rustc}, release), manifest {} ok",
        wasm.display(),
        bytes.len(),
        manifest_path.display()
    );
    // `invoke` loads it as the gateway does (`tp_init` included), then runs the events; with
    // none, it only loads it.
    let events = a.events.unwrap_or_else(|| a.dir.join("events.jsonl"));
    let mut invoke = Command::new(std::env::current_exe()?);
    invoke
        .arg("invoke")
        .arg("--handler")
        .arg(&wasm)
        .arg("--manifest")
        .arg(&manifest_path)
        .arg("--events");
    match events.exists() {
        true => {
            println!("== tidepool invoke on {}", events.display());
            invoke.arg(&events)
        }
        false => invoke.arg("-").stdin(std::process::Stdio::null()),
    };
    let ran = invoke.status()?;
    Ok(match ran.success() {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

/// The `.wasm` a cargo JSON message names: a `compiler-artifact` of a `cdylib`.
fn module_of(line: &str) -> Option<PathBuf> {
    let m: serde_json::Value = serde_json::from_str(line).ok()?;
    if m["reason"] != "compiler-artifact" {
        return None;
    }
    let cdylib = m["target"]["kind"]
        .as_array()?
        .iter()
        .any(|k| k == "cdylib");
    let files = m["filenames"].as_array()?;
    let wasm = files
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".wasm"))?;
    cdylib.then(|| PathBuf::from(wasm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_is_the_cdylib_artifact_cargo_names() {
        let artifact = r#"{"reason":"compiler-artifact","target":{"kind":["cdylib"],"name":"my_h"},"filenames":["/t/wasm32-unknown-unknown/release/my_h.wasm"]}"#;
        assert_eq!(
            module_of(artifact),
            Some(PathBuf::from("/t/wasm32-unknown-unknown/release/my_h.wasm"))
        );
        let dep = r#"{"reason":"compiler-artifact","target":{"kind":["lib"]},"filenames":["/t/libx.rlib"]}"#;
        assert_eq!(module_of(dep), None);
        assert_eq!(
            module_of(r#"{"reason":"build-finished","success":true}"#),
            None
        );
        assert_eq!(module_of("not json"), None);
    }

    #[test]
    fn names_that_make_a_crate_a_module_and_a_handler() {
        for ok in ["t", "my-handler", "a_b9"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "9a",
            "-a",
            "a.b",
            "a b",
            "Upper",
            "test",
            "serde",
            "tidepool-sdk",
            &"a".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(wasm_file("my-handler"), "my_handler.wasm");
    }

    #[test]
    fn every_template_renames_its_manifest() {
        for t in [
            Template::Threshold,
            Template::Window,
            Template::Deadband,
            Template::Empty,
        ] {
            let needle = format!("name = \"{}\"", t.manifest_name());
            assert!(t.files().manifest.contains(&needle), "{needle}");
        }
    }
}
