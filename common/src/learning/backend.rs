//! The one place that chooses the burn backend a site trains and evaluates on.
//!
//! # How burn 0.22 picks a backend
//!
//! Since burn 0.22 tensors and modules carry no backend type parameter: a
//! `Tensor<2>` runs on whatever backend its [`Device`] belongs to, and the
//! dispatch layer inside burn routes every operation at run time. Autodiff is
//! no longer a wrapper type either (`Autodiff<NdArray>` in older releases) but
//! a property of the device, switched on with [`Device::autodiff`]. So the
//! choice of backend here is a value, [`BackendKind`], that becomes a
//! [`Device`]; [`crate::learning::model`] and [`crate::learning::train`] are written once against
//! plain `Tensor`s and never name a backend type.
//!
//! # Why ndarray is the default
//!
//! The design asks for the burn-ndarray CPU backend: it is the long-standing,
//! widely used pure-Rust backend, needs no GPU, no C toolchain and no BLAS, so
//! a small supplier can run a participant on any office machine. burn 0.22
//! deprecates it in favour of burn-flex, its new pure-Rust CPU backend, which is
//! offered here behind the `flex` cargo feature so sites can move over once it
//! has proven itself; `docs/BENCHMARKS.md` compares the two. Both are compiled
//! with their default `std`, `simd` and multi-threading features because
//! `common/Cargo.toml` depends on them directly.
//!
//! # Adding a GPU backend
//!
//! 1. Enable the matching burn feature (`cuda`, `rocm`, `wgpu`, ...) behind a
//!    new cargo feature of this crate, as `flex` does.
//! 2. Add a variant to [`BackendKind`], its name to `FromStr`/`Display`, a
//!    `#[cfg]`-gated arm in [`available`] and in [`BackendKind::device`]
//!    (for example `Device::cuda(0)`).
//!
//! Nothing else changes: training and evaluation take the device from here.
//! Bit-exact reproducibility across runs is only promised on ndarray; GPU
//! kernels may reorder floating-point reductions.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::{Error, Result};

/// A CPU (or, later, GPU) backend burn can run the model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BackendKind {
    /// burn-ndarray: the default, always compiled in.
    #[default]
    NdArray,
    /// burn-flex: compiled in only with the `flex` cargo feature.
    Flex,
}

impl BackendKind {
    /// The name used on command lines and in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::NdArray => "ndarray",
            BackendKind::Flex => "flex",
        }
    }

    /// Whether this build can run the backend.
    pub fn is_available(self) -> bool {
        available().contains(&self)
    }

    /// The inference device of this backend (no gradients are recorded on it).
    ///
    /// Fails with [`Error::Model`] when the backend was not compiled in, so a
    /// configuration naming it is refused instead of silently falling back.
    pub fn device(self) -> Result<Device> {
        match self {
            // Deliberate: the design keeps ndarray as the default even though burn 0.22
            // deprecates it (see the module documentation).
            #[allow(deprecated)]
            BackendKind::NdArray => Ok(Device::ndarray()),
            #[cfg(feature = "flex")]
            BackendKind::Flex => Ok(Device::flex()),
            #[cfg(not(feature = "flex"))]
            BackendKind::Flex => Err(Error::Model(
                "backend 'flex' not compiled in; rebuild with --features flex".into(),
            )),
        }
    }

    /// The training device: the same backend with gradient recording switched on.
    pub fn autodiff_device(self) -> Result<Device> {
        Ok(self.device()?.autodiff())
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = Error;

    /// Parses `"ndarray"` or `"flex"` (case-insensitive). A known backend that was
    /// not compiled in still parses; [`BackendKind::device`] reports that.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ndarray" => Ok(BackendKind::NdArray),
            "flex" => Ok(BackendKind::Flex),
            other => Err(Error::Model(format!(
                "unknown backend '{other}'; expected 'ndarray' or 'flex'"
            ))),
        }
    }
}

/// The backends this build can run, the default first.
pub fn available() -> Vec<BackendKind> {
    #[allow(unused_mut)] // only mutated when optional backends are compiled in
    let mut kinds = vec![BackendKind::NdArray];
    #[cfg(feature = "flex")]
    kinds.push(BackendKind::Flex);
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_from_str() {
        for kind in [BackendKind::NdArray, BackendKind::Flex] {
            assert_eq!(kind.name().parse::<BackendKind>().unwrap(), kind);
            assert_eq!(kind.to_string(), kind.name());
        }
        assert_eq!(
            " NdArray ".parse::<BackendKind>().unwrap(),
            BackendKind::NdArray
        );
        let err = "cuda".parse::<BackendKind>().unwrap_err().to_string();
        assert!(err.contains("unknown backend 'cuda'"), "{err}");
    }

    #[test]
    fn ndarray_is_the_default_and_always_available() {
        assert_eq!(BackendKind::default(), BackendKind::NdArray);
        assert_eq!(available()[0], BackendKind::NdArray);
        assert!(BackendKind::NdArray.device().is_ok());
        assert!(
            BackendKind::NdArray
                .autodiff_device()
                .unwrap()
                .is_autodiff()
        );
        assert!(!BackendKind::NdArray.device().unwrap().is_autodiff());
    }

    #[test]
    fn flex_availability_follows_the_cargo_feature() {
        let device = BackendKind::Flex.device();
        #[cfg(feature = "flex")]
        {
            assert!(BackendKind::Flex.is_available());
            assert!(device.is_ok());
        }
        #[cfg(not(feature = "flex"))]
        {
            assert!(!BackendKind::Flex.is_available());
            assert_eq!(
                device.unwrap_err().to_string(),
                "model: backend 'flex' not compiled in; rebuild with --features flex"
            );
        }
    }
}
