//! Fuzz target: the exact FedAvg accumulator's chunk fold on arbitrary floats.
//!
//! `update_upload` drives the fold through the transfer path with a 16-value
//! model, one fold block; this target feeds `Accumulator::fold` chunks of up to
//! three blocks and more (the fold checks plausibility block by block and, on a
//! bad value, subtracts the blocks it already folded), with any bit patterns:
//! NaN payloads, infinities, subnormals, values at and beyond the bounds.
//! Invariants besides "no panic": a refused chunk leaves the accumulator exactly
//! as it was and its error names the first bad value's parameter; an accepted
//! chunk changes the accumulator exactly as folding its values one at a time
//! does, and unfolding it restores the accumulator bit for bit.
//!
//! Input: offset (u16), weight (u32), chunk length (u16), length of a plausible
//! prefix (u16), then little-endian f32 values repeated to fill the chunk after
//! the prefix. Short inputs thus reach long chunks with a bad value deep inside
//! (libFuzzer grows inputs slowly; a 16 KiB input per block would rarely be tried).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sangsaeng_common::aggregation::fedavg::{Accumulator, MAX_ABS_DELTA, MAX_TOTAL_WEIGHT};

/// Three fold blocks of 4,096 values and a bit: chunks cross block edges.
const NUM_PARAMS: usize = 3 * 4096 + 100;

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let u16_at = |i: usize| u16::from_le_bytes([data[i], data[i + 1]]) as usize;
    let offset = u16_at(0) % 200;
    let weight = u32::from_le_bytes([data[2], data[3], data[4], data[5]]) as u64
        % (MAX_TOTAL_WEIGHT / 2)
        + 1;
    let len = u16_at(6) % (NUM_PARAMS - offset) + 1;
    let prefix = u16_at(8).min(len);
    let given: Vec<f32> = data[10..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let values: Vec<f32> = (0..len)
        .map(|i| match i.checked_sub(prefix) {
            Some(j) if !given.is_empty() => given[j % given.len()],
            _ => (i % 13) as f32 * 1e-3 - 6e-3,
        })
        .collect();
    let mut acc = Accumulator::new(NUM_PARAMS);
    acc.reserve(MAX_TOTAL_WEIGHT / 2).unwrap();
    acc.fold(0, &vec![0.125; NUM_PARAMS], 7).unwrap();
    acc.reserve(weight).unwrap();
    let before = acc.clone();
    let bad = values
        .iter()
        .position(|v| !v.is_finite() || v.abs() > MAX_ABS_DELTA);
    match (acc.fold(offset, &values, weight), bad) {
        (Ok(()), None) => {
            // Value by value, through the same public fold, must give the same integers.
            let mut one_by_one = before.clone();
            for (i, v) in values.iter().enumerate() {
                one_by_one
                    .fold(offset + i, std::slice::from_ref(v), weight)
                    .unwrap();
            }
            assert_eq!(
                acc, one_by_one,
                "a chunk fold differs from its values folded one by one"
            );
            acc.unfold(offset, &values, weight);
            assert_eq!(acc, before, "unfolding an accepted chunk left a trace");
        }
        (Err(e), Some(i)) => {
            assert_eq!(acc, before, "a refused chunk left a trace");
            let e = e.to_string();
            assert!(
                e.contains(&format!("delta value #{} ", offset + i)),
                "{e} (bad value at {i})"
            );
        }
        (got, bad) => panic!("fold gave {got:?} for a chunk whose first bad value is {bad:?}"),
    }
});
