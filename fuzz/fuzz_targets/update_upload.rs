//! Fuzz target: a delta upload as the coordinator receives it.
//!
//! The input is a sequence of length-delimited `UpdateMessage`s, exactly the
//! frames of the `UploadUpdate` client stream. They drive the coordinator's own
//! `DeltaReceiver` (chunk order, size limit, per-chunk CRC-32C and digests,
//! whole digests in hex or raw form, SHA-256 or BLAKE3, length) and the exact FedAvg accumulator the way the service
//! does: digests settled into hex at the header and the trailer, weight
//! reserved at the header, each checked chunk folded as it arrives, and on any
//! refusal the folded chunks subtracted again. The header's encoding (float32,
//! float16, int8) picks the chunk decoder. Invariants checked besides "no panic":
//! an accepted delta has the declared length and digest, and a refused update
//! leaves the accumulator exactly (bit for bit) as it was before its header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sangsaeng_common::transfer::encoding::UpdateEncoding;
use sangsaeng_common::aggregation::fedavg::Accumulator;
use sangsaeng_coordinator::transfer::{self, DeltaReceiver};
use sangsaeng_proto::v1 as pb;

/// Small on purpose: the fuzzer should reach "complete delta" often.
const NUM_PARAMS: usize = 16;
const MAX_CHUNK_BYTES: usize = 24;

/// Undoes an upload's folded chunks and its weight, then checks nothing is left.
fn refuse(acc: &mut Accumulator, folded: &[(usize, Vec<f32>)], weight: u64, before: &Accumulator) {
    for (offset, values) in folded {
        acc.unfold(*offset, values, weight);
    }
    acc.release(weight);
    assert_eq!(acc, before, "a refused update left a trace");
}

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    let mut acc = Accumulator::new(NUM_PARAMS);
    acc.add(&[0.25; NUM_PARAMS], 3)
        .expect("a valid first update");
    let before = acc.clone();
    let mut receiver: Option<DeltaReceiver> = None;
    let mut header = pb::UpdateHeader::default();
    let mut weight = 0u64;
    let mut folded: Vec<(usize, Vec<f32>)> = vec![];

    while let Ok(msg) = pb::UpdateMessage::decode_length_delimited(&mut buf) {
        match msg.part {
            Some(pb::update_message::Part::Header(mut h)) if receiver.is_none() => {
                if transfer::settle_header(&mut h).is_err() {
                    return;
                }
                let Ok(encoding) = UpdateEncoding::from_name(&h.encoding) else {
                    return;
                };
                if acc.reserve(h.num_examples).is_err() {
                    assert_eq!(acc, before);
                    return;
                }
                let Ok(algorithm) = transfer::delta_algorithm(&h) else {
                    acc.release(h.num_examples);
                    assert_eq!(acc, before);
                    return;
                };
                weight = h.num_examples;
                header = h;
                receiver = Some(DeltaReceiver::new(
                    NUM_PARAMS,
                    MAX_CHUNK_BYTES,
                    encoding,
                    algorithm,
                ));
            }
            Some(pb::update_message::Part::Chunk(c)) => {
                let Some(r) = receiver.as_mut() else { return };
                let Ok(chunk) = r.push(&c) else {
                    return refuse(&mut acc, &folded, weight, &before);
                };
                if acc.fold(chunk.offset, &chunk.values, weight).is_err() {
                    return refuse(&mut acc, &folded, weight, &before);
                }
                folded.push((chunk.offset, chunk.values.to_vec()));
            }
            Some(pb::update_message::Part::Trailer(mut t)) => {
                let Some(r) = receiver.take() else { return };
                let settled = transfer::settle_trailer(&mut t, &header);
                match settled.and_then(|()| r.finish(&t)) {
                    Ok(digest) => {
                        assert_eq!(digest, t.sha256);
                        let n: usize = folded.iter().map(|(_, v)| v.len()).sum();
                        assert_eq!(n, NUM_PARAMS);
                        acc.commit();
                    }
                    Err(_) => refuse(&mut acc, &folded, weight, &before),
                }
                return;
            }
            // A second header, or a message with no part: the upload is refused.
            _ => {
                if receiver.is_some() {
                    refuse(&mut acc, &folded, weight, &before);
                }
                return;
            }
        }
    }
    // The stream ended before its trailer (truncated).
    if receiver.is_some() {
        refuse(&mut acc, &folded, weight, &before);
    }
});
