//! What travels between coordinator and participants: model files, update
//! encodings, whole-object digests and the conversions to and from the
//! protocol's messages. Depends on [`crate::config`] and on the model's shape in
//! [`crate::learning::model`], never on training.
//!
//! - [`weights`]: model files (safetensors) and the model's SHA-256 identity.
//! - [`encoding`]: update deltas on the wire: float32, float16, or int8 with a
//!   scale per chunk.
//! - [`digest`]: whole-object transfer digests, SHA-256 or BLAKE3, and their text form.
//! - [`wire`]: conversions between `sangsaeng.v1` messages and the crate's types.

pub mod digest;
pub mod encoding;
pub mod weights;
pub mod wire;
