//! The `sangsaeng.v1` protocol: generated prost messages and tonic stubs.
//!
//! The `.proto` files in `proto/sangsaeng/v1/` are the contract between the
//! coordinator and participants; every field is documented there. This crate is
//! the one place where they are compiled.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("sangsaeng.v1");
}

pub use v1::*;
