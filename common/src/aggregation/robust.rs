//! Robust aggregation rules: what keeps one supplier with a broken export or a
//! hostile update from pulling the shared model anywhere.
//!
//! The coordinator reads the round's updates back from their spill files one
//! window of parameters at a time (K windows in memory, never K models), and
//! these functions turn a window of every update's values into the window of
//! the aggregate:
//! - [`median_window`]: coordinate-wise median (Yin et al. 2018);
//! - [`trimmed_mean_window`]: coordinate-wise mean after dropping the
//!   `trim_fraction` largest and smallest values;
//! - [`add_squared_distances`] and [`multi_krum_keep`]: Multi-Krum (Blanchard
//!   et al. 2017): the K − f updates whose K − f − 2 nearest neighbours are
//!   closest are kept and averaged (exactly, by the FedAvg accumulator).
//!
//! Coordinate-wise rules weigh every update equally (a claimed example count is
//! exactly what a hostile supplier would inflate). Values are sorted with
//! `total_cmp` and summed in sorted order, so the result depends on the set of
//! updates, not on the order they arrived in.

use crate::{Error, Result};

fn check_window(columns: &[&[f32]], out_len: usize) -> Result<()> {
    if columns.is_empty() || columns.iter().any(|c| c.len() != out_len) {
        return Err(Error::Aggregation(format!(
            "a robust window needs {out_len} values from each of at least one update"
        )));
    }
    Ok(())
}

/// An f32's bits as a u32 whose unsigned order is `f32::total_cmp`'s: the
/// coordinate-wise rules sort K integers per coordinate instead of calling a
/// float comparison (twice as fast, the same order, so the same result).
fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

fn from_order_key(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k })
}

/// Per coordinate: the sorted order keys of every update's value.
fn sorted_at(columns: &[&[f32]], i: usize, buf: &mut Vec<u32>) {
    buf.clear();
    buf.extend(columns.iter().map(|c| order_key(c[i])));
    buf.sort_unstable();
}

/// The coordinate-wise median of `columns` (one slice per update) into `out`;
/// for an even count, the mean of the two middle values. A selection, not a
/// sort: the middle value(s) are the same whatever order the updates come in.
pub fn median_window(columns: &[&[f32]], out: &mut [f64]) -> Result<()> {
    check_window(columns, out.len())?;
    let k = columns.len();
    let mut buf: Vec<u32> = Vec::with_capacity(k);
    for (i, o) in out.iter_mut().enumerate() {
        buf.clear();
        buf.extend(columns.iter().map(|c| order_key(c[i])));
        let (below, upper, _) = buf.select_nth_unstable(k / 2);
        let upper = from_order_key(*upper) as f64;
        *o = match k % 2 {
            1 => upper,
            _ => {
                let lower = from_order_key(*below.iter().max().expect("k ≥ 2")) as f64;
                (lower + upper) / 2.0
            }
        };
    }
    Ok(())
}

/// How many values the trimmed mean drops at each end, for `k` updates.
pub fn trimmed(k: usize, trim_fraction: f64) -> usize {
    ((k as f64 * trim_fraction).floor() as usize).min(k.saturating_sub(1) / 2)
}

/// The coordinate-wise trimmed mean of `columns` into `out`.
pub fn trimmed_mean_window(columns: &[&[f32]], trim_fraction: f64, out: &mut [f64]) -> Result<()> {
    check_window(columns, out.len())?;
    let k = columns.len();
    let t = trimmed(k, trim_fraction);
    let kept = (k - 2 * t) as f64;
    let mut buf = Vec::with_capacity(k);
    for (i, o) in out.iter_mut().enumerate() {
        sorted_at(columns, i, &mut buf);
        *o = buf[t..k - t]
            .iter()
            .map(|&v| from_order_key(v) as f64)
            .sum::<f64>()
            / kept;
    }
    Ok(())
}

/// Adds the window's contribution to every pair's squared L2 distance
/// (`dist[a * k + b]`, symmetric).
pub fn add_squared_distances(columns: &[&[f32]], dist: &mut [f64]) -> Result<()> {
    let k = columns.len();
    if dist.len() != k * k {
        return Err(Error::Aggregation(format!(
            "a distance matrix of {} entries for {k} updates",
            dist.len()
        )));
    }
    for a in 0..k {
        for b in a + 1..k {
            let d: f64 = columns[a]
                .iter()
                .zip(columns[b])
                .map(|(x, y)| {
                    let e = *x as f64 - *y as f64;
                    e * e
                })
                .sum();
            dist[a * k + b] += d;
            dist[b * k + a] += d;
        }
    }
    Ok(())
}

/// Each update's Krum score: the sum of its squared distances to its
/// K − f − 2 nearest others. Needs K ≥ 2f + 3.
pub fn krum_scores(dist: &[f64], k: usize, f: usize) -> Result<Vec<f64>> {
    if k < 2 * f + 3 || dist.len() != k * k {
        return Err(Error::Aggregation(format!(
            "multi-krum with f = {f} needs at least {} updates, the round has {k}",
            2 * f + 3
        )));
    }
    let neighbours = k - f - 2;
    Ok((0..k)
        .map(|a| {
            let mut row: Vec<f64> = (0..k)
                .filter(|&b| b != a)
                .map(|b| dist[a * k + b])
                .collect();
            row.sort_unstable_by(f64::total_cmp);
            row[..neighbours].iter().sum()
        })
        .collect())
}

/// Multi-Krum's selection: each update's score is the sum of its squared
/// distances to its K − f − 2 nearest others; the K − f lowest scores are
/// kept (ties by index). Returns the kept indices, ascending. Needs K ≥ 2f + 3.
pub fn multi_krum_keep(dist: &[f64], k: usize, f: usize) -> Result<Vec<usize>> {
    let mut scores: Vec<(f64, usize)> = krum_scores(dist, k, f)?.into_iter().zip(0..).collect();
    scores.sort_unstable_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    let mut keep: Vec<usize> = scores[..k - f].iter().map(|s| s.1).collect();
    keep.sort_unstable();
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_sort_as_total_cmp_and_round_trip() {
        let mut v = vec![
            -f32::INFINITY,
            -3.5,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            f32::MIN_POSITIVE,
            2.0,
            f32::MAX,
            f32::INFINITY,
        ];
        v.reverse();
        let mut by_key: Vec<u32> = v.iter().map(|&x| order_key(x)).collect();
        by_key.sort_unstable();
        let mut by_cmp = v.clone();
        by_cmp.sort_by(f32::total_cmp);
        let back: Vec<u32> = by_key
            .iter()
            .map(|&k| from_order_key(k).to_bits())
            .collect();
        assert_eq!(back, by_cmp.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two_in_any_order() {
        let cols: [[f32; 1]; 4] = [[4.0], [-1.0], [2.0], [10.0]];
        let mut out = [0f64; 1];
        let mut order: Vec<&[f32]> = cols.iter().map(|c| &c[..]).collect();
        median_window(&order, &mut out).unwrap();
        assert_eq!(out[0], 3.0);
        order.reverse();
        median_window(&order, &mut out).unwrap();
        assert_eq!(out[0], 3.0);
    }

    #[test]
    fn median_and_trimmed_mean_ignore_one_outlier() {
        let (a, b, c, d, e) = (
            [1.0f32, 0.0],
            [2.0, 0.1],
            [3.0, -0.1],
            [4.0, 0.2],
            [1e6, -1e6],
        );
        let cols: Vec<&[f32]> = vec![&a, &b, &c, &d, &e];
        let mut out = [0.0; 2];
        median_window(&cols, &mut out).unwrap();
        assert_eq!(out, [3.0, 0.0]);
        trimmed_mean_window(&cols, 0.2, &mut out).unwrap();
        assert_eq!(out[0], 3.0);
        assert!((out[1] - (0.0f32 as f64 + 0.1f32 as f64 - 0.1f32 as f64) / 3.0).abs() < 1e-12);
        // Order-independent: the same set in another order gives the same bits.
        let rev: Vec<&[f32]> = cols.iter().rev().copied().collect();
        let mut again = [0.0; 2];
        trimmed_mean_window(&rev, 0.2, &mut again).unwrap();
        assert_eq!(out.map(f64::to_bits), again.map(f64::to_bits));
        let even: Vec<&[f32]> = vec![&a, &b, &c, &d];
        median_window(&even, &mut out).unwrap();
        assert_eq!(out[0], 2.5);
        assert_eq!(trimmed(5, 0.2), 1);
        assert_eq!(trimmed(3, 0.49), 1);
        assert_eq!(trimmed(2, 0.49), 0);
    }

    #[test]
    fn multi_krum_drops_the_far_update() {
        let ups: Vec<[f32; 2]> = vec![
            [0.0, 0.0],
            [0.1, 0.0],
            [0.0, 0.1],
            [0.1, 0.1],
            [50.0, -50.0],
        ];
        let cols: Vec<&[f32]> = ups.iter().map(|u| &u[..]).collect();
        let mut dist = vec![0.0; 25];
        add_squared_distances(&cols, &mut dist).unwrap();
        assert_eq!(multi_krum_keep(&dist, 5, 1).unwrap(), vec![0, 1, 2, 3]);
        assert!(multi_krum_keep(&dist, 5, 2).is_err());
    }
}
