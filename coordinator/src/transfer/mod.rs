//! Chunked transfers at the coordinator: what a round offers for download, the
//! checks on each uploaded delta, and the spill file an upload is kept in.
//!
//! - [`model`]: the global model of a round, digested once and streamed to
//!   every downloader from one copy.
//! - [`delta`]: [`delta::DeltaReceiver`], the chunk-by-chunk and whole-object
//!   checks on an uploaded delta, and the normalisation of its header and trailer.
//! - [`spill`]: the on-disk copy of an upload's chunks (direct I/O where the file
//!   system allows), read back to undo a refused upload or restore an accepted one.

pub mod delta;
pub mod model;
pub mod spill;

pub use delta::{
    CheckedChunk, DeltaReceiver, Payload, delta_algorithm, settle_header, settle_trailer,
};
pub use model::{ModelDigests, PublishedModel};
pub use spill::{SPILL_MAGIC, Spill, read_spill, read_spill_raw};
