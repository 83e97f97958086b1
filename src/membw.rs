//! The memory-bandwidth probe the benchmarks report their aggregation throughput
//! against: the best of three sums over 1 GiB of f32 (read bandwidth), the same
//! measure as the Flower harness's numpy floor (`np.sum` over 1 GiB).

use std::time::Instant;

/// Read bandwidth of this machine now, in GB/s.
pub fn read_bandwidth_gbs() -> f64 {
    let v = vec![1.0f32; 1 << 28];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        // Eight partial sums so the loop is bound by memory, not by one add chain.
        let s: f32 = v
            .chunks_exact(8)
            .fold([0f32; 8], |mut acc, c| {
                for k in 0..8 {
                    acc[k] += c[k];
                }
                acc
            })
            .iter()
            .sum();
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (v.len() * 4) as f64 / best / 1e9
}
