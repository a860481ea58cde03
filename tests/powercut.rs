//! Power cuts. `kill -9` keeps the page cache, so it cannot catch a missing fsync; here the
//! gateway's data dir sits on `tests/powercut/lazyfs.py`, a FUSE file system that keeps only
//! what was fsynced (after Jepsen's LazyFS). Each cycle: publish, collect acks, kill -9 the
//! gateway, unmount and remount (everything not synced is gone), then check that every acked
//! event is still there exactly once. `TIDEPOOL_POWERCUT_CYCLES` sets the number of cycles
//! (`scripts/soak.sh` runs more). Needs root, /dev/fuse, fusepy and libfuse2
//! (`scripts/test.sh` installs them).

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use support::*;
use tidepool::proto::msg::{DeviceMsg, GatewayMsg};

/// A lazyfs mount: `state/durable` survives a power cut, `state/live` does not.
struct LazyFs {
    script: PathBuf,
    state: PathBuf,
    mnt: PathBuf,
    child: Option<Child>,
}

impl LazyFs {
    fn mount(state: &Path, mnt: &Path) -> LazyFs {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/powercut/lazyfs.py");
        let mut fs = LazyFs {
            script,
            state: state.to_path_buf(),
            mnt: mnt.to_path_buf(),
            child: None,
        };
        fs.power_on();
        fs
    }

    /// Mounts, rebuilding what programs see from what was synced; waits for libfuse's init.
    fn power_on(&mut self) {
        let mut child = Command::new("python3")
            .arg(&self.script)
            .arg(&self.state)
            .arg(&self.mnt)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs lazyfs.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "lazyfs: mounted" {
            let status = child.wait().unwrap();
            panic!(
                "lazyfs did not mount ({status}); it needs root, /dev/fuse, `apt-get install -y fuse3 libfuse2` and `pip install fusepy` (scripts/test.sh installs them)"
            );
        }
        self.child = Some(child);
    }

    /// Power off: unmount (the gateway is dead, nothing holds a file) and wait for the daemon.
    fn power_off(&mut self) {
        let ok = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mnt)
                .status();
        }
        if let Some(mut c) = self.child.take() {
            c.wait().unwrap();
        }
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.power_off();
        }
    }
}

/// Counts its invocations in the first 8 bytes (u64 LE) of a 200 kB state value: sled writes
/// a page that large to a file of its own under `db/blobs/`, which sled never syncs.
const BIG_COUNTER_WAT: &str = r#"(module
  (import "tidepool" "state_get" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "tidepool" "state_put" (func $put (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 5)
  (data (i32.const 0) "big")
  (func (export "tp_alloc") (param i32) (result i32) (i32.const 16))
  (func (export "tp_on_event") (param i32 i32 i32 i32) (result i32)
    (i64.store (i32.const 1024) (i64.const 0))
    (drop (call $get (i32.const 0) (i32.const 3) (i32.const 1024) (i32.const 200000)))
    (i64.store (i32.const 1024) (i64.add (i64.load (i32.const 1024)) (i64.const 1)))
    (call $put (i32.const 0) (i32.const 3) (i32.const 1024) (i32.const 200000))))"#;

/// The durable mark of `device` and the two counters, read from the store.
fn durable(data: &Path, device: &str) -> (u64, u64, u64) {
    let store = tidepool::store::Store::open(&data.join("db"), 1 << 20).expect("the store opens");
    let hwm = store.hwm(device).unwrap();
    let count = |handler, key: &[u8]| {
        store
            .state_durable(handler, key)
            .unwrap()
            .map_or(0, |v| u64::from_le_bytes(v[..8].try_into().unwrap()))
    };
    (hwm, count("counter", b"n"), count("big", b"big"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_survive_a_power_cut_exactly_once() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let cycles = env("TIDEPOOL_POWERCUT_CYCLES", 3);
    let seed = env("TIDEPOOL_POWERCUT_SEED", cycles);
    eprintln!("power-cut schedule: {cycles} cuts, TIDEPOOL_POWERCUT_SEED={seed}");
    let work = tempfile::tempdir().unwrap();
    let (state, mnt) = (work.path().join("state"), work.path().join("mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    let handlers = wat_handler(work.path(), "counter", COUNTER_WAT, "")
        + &wat_handler(
            work.path(),
            "big",
            BIG_COUNTER_WAT,
            "[limits]\nstate_bytes = 1048576\nmemory_pages = 5",
        );
    let mut fs = LazyFs::mount(&state, &mnt);
    let data = mnt.join("data");
    let mut acked = 0u64;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut unacked_lost = 0;
    for cycle in 1..=cycles {
        let mut gw = Gateway::start_in(&data, &handlers);
        let dev = gw.connect("dev-pc").await;
        let mut s = dev.open().await.unwrap();
        s.send(&DeviceMsg::Hello).await.unwrap();
        let Some(GatewayMsg::Welcome { hwm, .. }) = next_msg(&mut s).await else {
            panic!("no welcome")
        };
        assert!(
            hwm >= acked,
            "cycle {cycle}: acked {acked}, the mark is {hwm}"
        );
        let mut seq = hwm;
        // A few bursts (several groups each), every one acked before the cut.
        for _ in 0..rng.u64(2..5) {
            for _ in 0..rng.u64(1..30) {
                seq += 1;
                s.push(&publish(seq, "devices/dev-pc/t", b"x"));
            }
            s.flush().await.unwrap();
            until_ack(&mut s, seq).await;
            acked = seq;
        }
        // One more burst that may or may not be kept: not waited for.
        for _ in 0..rng.u64(0..20) {
            seq += 1;
            s.push(&publish(seq, "devices/dev-pc/t", b"x"));
        }
        s.flush().await.unwrap();
        gw.kill();
        drop(dev);
        fs.power_off();
        fs.power_on();
        let (hwm, n, big) = durable(&data, "dev-pc");
        assert!(
            hwm >= acked,
            "seed {seed} cycle {cycle}: {acked} events were acked, but after the power cut the mark is {hwm}"
        );
        unacked_lost += seq - hwm;
        assert_eq!(
            (n, big),
            (hwm, hwm),
            "seed {seed} cycle {cycle}: each kept event ran once in each handler and nothing is half-applied"
        );
        acked = hwm;
    }
    eprintln!(
        "powercut: {cycles} cuts, {acked} events kept and checked, 0 acked lost, {unacked_lost} sent but unacked not kept (allowed)"
    );
    assert!(
        data.join("db/blobs").read_dir().unwrap().next().is_some(),
        "the big value was written as a blob file"
    );
}
