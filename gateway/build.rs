//! Stamps the build time into the binary (`clock::BUILD_S`): the earliest time a certificate
//! is ever checked at, on a board whose clock starts at 1970. `SOURCE_DATE_EPOCH` (a
//! reproducible build's time) wins over the build machine's clock.

fn main() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let t = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(now);
    println!("cargo:rustc-env=TIDEPOOL_BUILD_UNIX={t}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
    // Stamped again whenever the code changes (a target dir kept for months would otherwise
    // ship the floor of its first build).
    println!("cargo:rerun-if-changed=src");
}
