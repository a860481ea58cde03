//! The frame decoder on any bytes, fed in any chunks: it never panics, never returns a frame
//! over its maximum, and once it reports an error (the framing is lost) it is not asked again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool::proto::frame::FrameDecoder;

const MAX: u32 = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut d = FrameDecoder::new(MAX);
    let step = usize::from(split).max(1);
    for chunk in rest.chunks(step) {
        d.extend(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => assert!(f.len() <= MAX as usize && !f.is_empty()),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
