//! Aggregation throughput of the coordinator's exact FedAvg accumulator, next to
//! the machine's memory bandwidth measured in the same run.
//!
//! ```text
//! cargo bench --bench aggregation                 # P = 1e6, 1e7, 1e8; K = 8
//! cargo bench --bench aggregation -- 1e7 32       # one point
//! ```
//!
//! K updates of P float32 values are folded chunk by chunk (1 MiB chunks, as
//! they arrive over the wire), the chunks of all updates interleaved round-robin
//! like concurrent uploads, then the mean is applied to the model once. Reported:
//! decoded update bytes folded per second, and the memory traffic that implies
//! (per value: the f32 read, the i64 accumulator read and written: 20 bytes),
//! against `sum` of 1 GiB of f32 (read bandwidth, as the Flower harness's numpy
//! floor measures it). In a federation the same fold runs inside the upload
//! handlers, interleaved with TLS and hashing; the figures there are in
//! `examples/federation_bench.rs`'s `fold_gb_per_s`.

use std::time::Instant;

use sangsaeng_common::fedavg::Accumulator;

const CHUNK_VALUES: usize = 1 << 18;

fn point(p: usize, k: usize, bandwidth: f64) {
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
    for i in 0..k {
        acc.reserve(100 + 7 * i as u64).unwrap();
    }
    let t = Instant::now();
    for start in (0..p).step_by(CHUNK_VALUES) {
        let end = (start + CHUNK_VALUES).min(p);
        for i in 0..k {
            let u = &updates[i % 2];
            acc.fold(start, &u[start..end], 100 + 7 * i as u64).unwrap();
        }
    }
    let fold = t.elapsed().as_secs_f64();
    (0..k).for_each(|_| acc.commit());
    let t = Instant::now();
    acc.apply_in_place(&mut global).unwrap();
    let apply = t.elapsed().as_secs_f64();
    std::hint::black_box(&global);
    let bytes = (p * k * 4) as f64;
    let rate = bytes / (fold + apply) / 1e9;
    let traffic = (p * k * 20 + p * 24) as f64 / (fold + apply) / 1e9;
    println!(
        "| {p:.0e} | {k} | {fold:.3} | {apply:.3} | {rate:.2} | {traffic:.1} | {bandwidth:.1} | {:.0} % |",
        100.0 * traffic / bandwidth
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let bandwidth = sangsaeng::membw::read_bandwidth_gbs();
    println!(
        "| P | K | fold s | apply s | update GB/s | memory traffic GB/s | read bandwidth GB/s | traffic / bandwidth |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let parse = |s: &str| s.parse::<f64>().expect("a number") as usize;
    if args.len() == 2 {
        point(parse(&args[0]), parse(&args[1]), bandwidth);
    } else {
        for p in [1e6, 1e7, 1e8] {
            point(p as usize, 8, bandwidth);
        }
    }
}
