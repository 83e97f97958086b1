//! Fuzz target: the secure-aggregation byte formats a participant receives
//! relayed by the coordinator (a Shamir share, a sealed share pair).
//!
//! Both come through a party the protocol does not trust. A malformed one must
//! be an error naming what is wrong, never a panic; one that decodes must
//! encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sangsaeng_common::privacy::secagg::RoundContext;
use sangsaeng_common::privacy::secagg::SealedSharePair;
use sangsaeng_common::privacy::secagg::shamir::Share;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    if kind % 2 == 0 {
        if let Ok(share) = Share::from_bytes(bytes) {
            assert_eq!(&share.as_bytes()[..], bytes, "a share re-encodes to its bytes");
        }
    } else {
        let ctx = RoundContext::new("t-fuzz", 1, 0).expect("a valid context");
        if let Ok(sealed) = SealedSharePair::from_bytes(&ctx, bytes) {
            assert_eq!(&sealed.to_bytes()[..], bytes, "a sealed pair re-encodes to its bytes");
        }
    }
});
