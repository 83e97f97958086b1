//! Secure aggregation (SecAgg / SecAgg+): the coordinator learns the sum of
//! the participants' updates, never one participant's update, and the sum
//! survives participants dropping out mid-round.
//!
//! Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
//! Machine Learning", with the sparse neighbourhood graph of Bell et al. 2020,
//! "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead". Every
//! participant masks its fixed-point update with a self mask and one pairwise
//! mask per neighbour, in Z_2^64 (the accumulator's wrapping `i64`); pairwise
//! masks cancel in the sum, and Shamir shares of each participant's two
//! secrets let the coordinator remove what is left: the self masks of the
//! survivors, and the pairwise masks of those that dropped.
//!
//! The core is pure functions and state machines, with no networking; [`wire`]
//! maps it onto the `sangsaeng.v1` messages (and signs adverts with the TLS
//! keys). The round's steps over gRPC are the coordinator's `round/secure`
//! and the participant's `secure` module.
//!
//! Map:
//! - [`context`]: the round a message belongs to; canonical, domain-separated
//!   encoding of everything that is signed, hashed or authenticated.
//! - [`keys`]: per-round key pairs and self-mask seed; the signed advert.
//! - [`graph`]: the k-regular neighbourhood graph (complete graph = SecAgg).
//! - [`agreement`]: X25519 + HKDF for pairwise mask seeds and share keys.
//! - [`mask`]: seekable ChaCha20 mask streams; masking a chunk in place.
//! - [`shamir`]: t-of-k sharing of the two secrets; verified reconstruction.
//! - [`sealed`]: ChaCha20-Poly1305 sealing of the share pairs in transit.
//! - [`protocol`]: round configuration, threshold rules, unmasking messages.
//! - [`participant`]: the participant's state machine.
//! - [`coordinator`]: the coordinator's state machine.
//! - [`unmask`]: removing the masks from the sum, chunk by chunk.
//! - [`wire`]: the protocol messages, advert signatures, masked chunks.
//!
//! Shamir crate: vsss-rs 6 (audited, constant-time GF(256) without lookup
//! tables, explicit non-zero share ids, no RustSec advisory), over blahaj, the
//! sharks fork, whose table-driven GF(256) indexes memory by secret bytes.

pub mod agreement;
pub mod context;
pub mod coordinator;
pub mod graph;
pub mod keys;
pub mod mask;
pub mod participant;
pub mod protocol;
pub mod sealed;
pub mod shamir;
pub mod unmask;
pub mod wire;

pub use context::RoundContext;
pub use coordinator::{Coordinator, ShareRouting, SuspectShare};
pub use graph::{Graph, graph_seed};
pub use keys::{Advert, RoundKeys, advert_signing_bytes};
pub use mask::{MaskSeed, MaskStream, mask_chunk};
pub use participant::Participant;
pub use protocol::{
    RoundConfig, UnmaskRequest, UnmaskResponse, default_threshold, validate_threshold,
};
pub use sealed::SealedSharePair;
pub use unmask::Unmasker;
