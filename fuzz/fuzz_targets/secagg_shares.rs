//! Fuzz target: the secure-aggregation inputs that come through a party the
//! protocol does not trust: a Shamir share, a sealed share pair, a relayed
//! advert, an unmasking answer and a masked chunk's words (the protobuf
//! messages decoded as tonic would, then the checks of
//! `privacy::secagg::wire`).
//!
//! A malformed one must be an error naming what is wrong, never a panic; one
//! that decodes must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sangsaeng_common::privacy::secagg::shamir::Share;
use sangsaeng_common::privacy::secagg::{RoundContext, SealedSharePair, wire};
use sangsaeng_proto::v1 as pb;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let ctx = RoundContext::new("t-fuzz", 1, 0).expect("a valid context");
    match kind % 5 {
        0 => {
            if let Ok(share) = Share::from_bytes(bytes) {
                assert_eq!(&share.as_bytes()[..], bytes, "a share re-encodes to its bytes");
            }
        }
        1 => {
            if let Ok(sealed) = SealedSharePair::from_bytes(&ctx, bytes) {
                assert_eq!(&sealed.to_bytes()[..], bytes, "a sealed pair re-encodes to its bytes");
            }
        }
        2 => {
            if let Ok(a) = pb::SignedAdvert::decode(bytes)
                && let Ok(advert) = wire::advert_from_proto(&ctx, &a)
            {
                assert_eq!(advert.c_pk[..], a.c_pk[..]);
                assert_eq!(advert.participant, a.participant);
            }
        }
        3 => {
            if let Ok(m) = pb::UnmaskShares::decode(bytes)
                && let Ok(r) = wire::unmask_response_from_proto(&ctx, 7, &m)
            {
                let back = wire::unmask_response_to_proto(&r);
                assert_eq!(back, m, "an unmasking answer re-encodes to itself");
            }
        }
        _ => {
            let mut words = Vec::new();
            if wire::decode_words(bytes, &mut words).is_ok() {
                let back: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                assert_eq!(back, bytes, "masked words re-encode to their bytes");
            }
        }
    }
});
