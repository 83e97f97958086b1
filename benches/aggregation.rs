//! Aggregation throughput of the coordinator's exact FedAvg accumulator, next to
//! the machine's memory bandwidth measured in the same run.
//!
//! ```text
//! cargo bench --bench aggregation                 # P = 1e6, 1e7, 1e8; K = 8; S = 4, 8
//! cargo bench --bench aggregation -- 1e7 32       # one point, S = 4
//! cargo bench --bench aggregation -- 1e7 32 32    # one point, S = 32
//! ```
//!
//! K updates of P float32 values are folded chunk by chunk (1 MiB chunks, as
//! they arrive over the wire), S uploads at a time with their chunks interleaved
//! round-robin, as concurrent uploads arrive (the coordinator receives
//! `limits.max_concurrent_uploads` at once, 4 by default; the earlier figures in
//! docs/BENCHMARKS.md interleaved all K), then the mean is applied to the model
//! once. The
//! round is run twice: into a fresh accumulator (the coordinator's first round,
//! page faults included) and into the same one reset (every later round); the
//! rates are the second's. Each point runs two ways: chunks folded straight from
//! the updates in memory, and chunks first copied into receive buffers (untimed),
//! as the coordinator decodes each chunk into a buffer just before folding it,
//! so the chunk is in cache. Reported: decoded update bytes folded per second,
//! and the memory traffic that implies (per value: the i64 accumulator read and
//! written, 16 bytes, plus the f32 read when it comes from memory),
//! against `sum` of 1 GiB of f32 (read bandwidth, as the Flower harness's numpy
//! floor measures it). In a federation the same fold runs inside the upload
//! handlers, interleaved with TLS and hashing; the figures there are in
//! `examples/federation_bench.rs`'s `fold_gb_per_s`.

use std::time::Instant;

use sangsaeng_common::aggregation::fedavg::Accumulator;

const CHUNK_VALUES: usize = 1 << 18;

fn point(p: usize, k: usize, s: usize, mode: Mode, bandwidth: f64) {
    // Two distinct updates reused K times: P*K values would not fit in memory at
    // 1e8 x 32, and the accumulator cannot tell (it is the same work).
    let updates: Vec<Vec<f32>> = (0..2)
        .map(|u| {
            (0..p)
                .map(|j| ((j * 7 + u * 13) % 2001) as f32 * 1e-6 - 1e-3)
                .collect()
        })
        .collect();
    let mut global = vec![0.1f32; p];
    let mut acc = Accumulator::new(p);
    // Round 1 folds into fresh memory (a page fault per 4 KiB on first touch);
    // round 2 into the same accumulator reset, as the coordinator's later rounds do.
    let fresh = fold_round(&mut acc, &updates, k, s, mode);
    acc.reset();
    let fold = fold_round(&mut acc, &updates, k, s, mode);
    let t = Instant::now();
    acc.apply_in_place(&mut global).unwrap();
    let apply = t.elapsed().as_secs_f64();
    std::hint::black_box(&global);
    let bytes = (p * k * 4) as f64;
    let rate = bytes / (fold + apply) / 1e9;
    // Per value folded: the i64 accumulator read and written, plus the f32 read
    // when it comes from memory (a received chunk is in cache).
    let per_value = match mode {
        Mode::Memory => 20,
        Mode::Received => 16,
    };
    let traffic = (p * k * per_value + p * 24) as f64 / (fold + apply) / 1e9;
    println!(
        "| {p:.0e} | {k} | {s} | {} | {fresh:.3} | {fold:.3} | {apply:.3} | {rate:.2} | {traffic:.1} | {bandwidth:.1} | {:.0} % | {:.0} % |",
        mode.name(),
        100.0 * rate / bandwidth,
        100.0 * traffic / bandwidth
    );
}

/// How the chunks reach the fold.
#[derive(Clone, Copy)]
enum Mode {
    /// Straight from the updates in memory, one chunk at a time.
    Memory,
    /// Copied into a receive buffer first (untimed), as the coordinator decodes
    /// a chunk just before it folds it, then folded one at a time.
    Received,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Memory => "from memory",
            Mode::Received => "received",
        }
    }
}

/// Folds K updates chunk by chunk, S uploads at a time with their chunks
/// interleaved round-robin; returns the seconds the folds took.
fn fold_round(acc: &mut Accumulator, updates: &[Vec<f32>], k: usize, s: usize, mode: Mode) -> f64 {
    let p = acc.num_params();
    let weight = |i: usize| 100 + 7 * i as u64;
    for i in 0..k {
        acc.reserve(weight(i)).unwrap();
    }
    let mut buffers = vec![vec![0f32; CHUNK_VALUES]; s];
    let mut secs = 0.0;
    for group in (0..k).step_by(s) {
        let uploads = group..(group + s).min(k);
        for start in (0..p).step_by(CHUNK_VALUES) {
            let end = (start + CHUNK_VALUES).min(p);
            if let Mode::Received = mode {
                for (b, i) in buffers.iter_mut().zip(uploads.clone()) {
                    b.truncate(0);
                    b.extend_from_slice(&updates[i % 2][start..end]);
                }
            }
            let t = Instant::now();
            for (j, i) in uploads.clone().enumerate() {
                let values = match mode {
                    Mode::Memory => &updates[i % 2][start..end],
                    Mode::Received => &buffers[j][..],
                };
                acc.fold(start, values, weight(i)).unwrap();
            }
            secs += t.elapsed().as_secs_f64();
        }
    }
    (0..k).for_each(|_| acc.commit());
    secs
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let bandwidth = sangsaeng::membw::read_bandwidth_gbs();
    println!(
        "| P | K | S | chunks | fold s, fresh accumulator | fold s, reused | apply s | update GB/s | memory traffic GB/s | read bandwidth GB/s | update / bandwidth | traffic / bandwidth |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let parse = |s: &str| s.parse::<f64>().expect("a number") as usize;
    let points: Vec<(usize, usize, usize)> = match args.as_slice() {
        [p, k] => vec![(parse(p), parse(k), 4)],
        [p, k, s] => vec![(parse(p), parse(k), parse(s))],
        _ => [1e6, 1e7, 1e8]
            .iter()
            .flat_map(|&p| [4, 8].map(|s| (p as usize, 8, s)))
            .collect(),
    };
    for (p, k, s) in points {
        for mode in [Mode::Memory, Mode::Received] {
            point(p, k, s, mode, bandwidth);
        }
    }
}
