//! Secure aggregation's masking throughput at 1 MiB chunks, against the raw
//! ChaCha20 keystream rate measured in the same run: `cargo bench --bench secagg_mask`.

use std::time::Instant;

use sangsaeng::common::privacy::secagg::mask::{MaskSeed, Sign, apply_masks, mask_chunk};

/// 1 MiB of i64 values.
const CHUNK: usize = 1 << 17;

fn seed(i: u32) -> MaskSeed {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_le_bytes());
    b[31] = 0x5a;
    MaskSeed::from_bytes(b)
}

fn measure(label: &str, keystreams: usize, mut one_chunk: impl FnMut(&mut [i64], u64)) {
    let mut values = vec![0i64; CHUNK];
    one_chunk(&mut values, 0); // warm-up
    let chunks = (256 / keystreams).max(4);
    let start = Instant::now();
    for c in 0..chunks {
        // Offsets spread up to ~1e8 parameters: seeking costs nothing.
        let offset = (c as u64 * 7919 * CHUNK as u64) % 100_000_000;
        one_chunk(&mut values, offset);
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = (chunks * CHUNK) as f64 / secs;
    println!(
        "{label}: {keystreams} keystreams, {:.2e} values/s ({:.0} MiB/s of output, {:.2} GB/s of keystream); P = 1e7: {:.2} s, P = 1e8: {:.1} s",
        rate,
        rate * 8.0 / (1 << 20) as f64,
        rate * 8.0 * keystreams as f64 / 1e9,
        1e7 / rate,
        1e8 / rate
    );
}

fn main() {
    // Baseline: the raw ChaCha20 keystream rate of this machine (chacha20 0.9,
    // AVX2 where the CPU has it), what masking can at best reach per stream.
    {
        use chacha20::ChaCha20;
        use chacha20::cipher::{KeyIvInit, StreamCipher};
        let mut c = ChaCha20::new((&[7u8; 32]).into(), (&[0u8; 12]).into());
        let mut buf = vec![0u8; CHUNK * 8];
        let start = Instant::now();
        for _ in 0..64 {
            c.apply_keystream(&mut buf);
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "raw ChaCha20 keystream: {:.2} GB/s",
            64.0 * buf.len() as f64 / secs / 1e9
        );
    }
    for k in [0u32, 8, 32] {
        let b = seed(0);
        let pairwise: Vec<(u32, MaskSeed)> = (1..=k).map(|j| (j, seed(j))).collect();
        // Participant index in the middle: half the streams added, half subtracted.
        let me = k / 2 + 1000;
        let pairwise: Vec<(u32, MaskSeed)> = pairwise
            .into_iter()
            .map(|(j, s)| (if j <= k / 2 { j } else { j + 2000 }, s))
            .collect();
        measure(
            &format!("participant mask_chunk, k = {k}"),
            k as usize + 1,
            |values, offset| mask_chunk(values, offset, &b, &pairwise, me).unwrap(),
        );
    }
    // The coordinator's unmasking of n = 40 survivors with 1 dropout of k = 8:
    // 40 self masks + 8 pairwise corrections.
    let seeds: Vec<MaskSeed> = (0..48).map(seed).collect();
    let streams: Vec<(&MaskSeed, Sign)> = seeds.iter().map(|s| (s, Sign::Subtract)).collect();
    measure(
        "coordinator unmask, n = 40 (one dropout, k = 8)",
        48,
        |values, offset| apply_masks(values, offset, &streams).unwrap(),
    );
}
