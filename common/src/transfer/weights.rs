//! Model files and digests.
//!
//! A model travels and is stored as one flat vector of f32 in the canonical
//! layout of [`crate::learning::model::ModelSpec::layout`]. On disk it is safetensors (a
//! simple, safe, widely read format: the released weights load in Python with
//! the `safetensors` package, no pickle). Its identity is the SHA-256 of the
//! little-endian f32 bytes, the same digest the protocol uses.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use crate::learning::model::TensorSpec;
use crate::{Error, Result};

/// The little-endian bytes of a float slice, without copying where the machine
/// is little-endian (every platform Sangsaeng ships for).
pub fn le_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Little-endian bytes of a float vector (the wire and digest encoding).
pub fn to_le_bytes(values: &[f32]) -> Vec<u8> {
    le_bytes(values).into_owned()
}

/// Decodes little-endian f32 bytes; refuses a length that is not a multiple of 4.
pub fn from_le_bytes(bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::Model(format!(
            "{} bytes is not a whole number of float32 values",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Lowercase hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Digest of a model or delta: SHA-256 of its little-endian f32 bytes.
pub fn digest(values: &[f32]) -> String {
    sha256_hex(&le_bytes(values))
}

/// One safetensors view per layout entry over the little-endian `bytes` of
/// `values_len` values; refuses a layout of another size.
fn tensor_views<'a>(
    layout: &[TensorSpec],
    bytes: &'a [u8],
    values_len: usize,
) -> Result<Vec<(String, TensorView<'a>)>> {
    let expected: usize = layout.iter().map(TensorSpec::numel).sum();
    if expected != values_len {
        return Err(Error::Model(format!(
            "layout needs {expected} values, got {values_len}"
        )));
    }
    let mut views = Vec::with_capacity(layout.len());
    let mut offset = 0;
    for t in layout {
        let n = t.numel() * 4;
        let view = TensorView::new(Dtype::F32, t.shape.clone(), &bytes[offset..offset + n])
            .map_err(|e| Error::Model(format!("tensor {}: {e}", t.name)))?;
        views.push((t.name.clone(), view));
        offset += n;
    }
    Ok(views)
}

/// Encodes `values` as safetensors, one tensor per layout entry, with string metadata.
pub fn safetensors_bytes(
    layout: &[TensorSpec],
    values: &[f32],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes = le_bytes(values);
    let views = tensor_views(layout, &bytes, values.len())?;
    safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| Error::Model(format!("encoding safetensors: {e}")))
}

/// Writes `values` as safetensors (the format of [`safetensors_bytes`]) straight
/// from the slice, through a temporary file renamed into place and fsynced, so a
/// crash never leaves a half-written model and no copy of the model is made.
pub fn save_safetensors(
    path: &Path,
    layout: &[TensorSpec],
    values: &[f32],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes = le_bytes(values);
    let views = tensor_views(layout, &bytes, values.len())?;
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| Error::Model(format!("writing {}: {e}", tmp.display())))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Reads a safetensors model and checks it has exactly the layout's tensors.
pub fn load_safetensors(path: &Path, layout: &[TensorSpec]) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(&bytes, layout, &path.display().to_string())
}

/// Decodes safetensors bytes holding exactly the layout's tensors; `origin` names them in errors.
pub fn parse_safetensors(bytes: &[u8], layout: &[TensorSpec], origin: &str) -> Result<Vec<f32>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Model(format!("{origin}: not a safetensors file: {e}")))?;
    if st.len() != layout.len() {
        return Err(Error::Model(format!(
            "{origin}: holds {} tensors, the model has {}",
            st.len(),
            layout.len()
        )));
    }
    let mut out = Vec::with_capacity(layout.iter().map(TensorSpec::numel).sum());
    for t in layout {
        let view = st
            .tensor(&t.name)
            .map_err(|_| Error::Model(format!("{origin}: tensor '{}' is missing", t.name)))?;
        if view.dtype() != Dtype::F32 || view.shape() != t.shape.as_slice() {
            return Err(Error::Model(format!(
                "{origin}: tensor '{}' is {:?} {:?}, expected F32 {:?}",
                t.name,
                view.dtype(),
                view.shape(),
                t.shape
            )));
        }
        let data = view.data();
        if !data.len().is_multiple_of(4) {
            return Err(Error::Model(format!(
                "{origin}: tensor '{}' is not whole float32 values",
                t.name
            )));
        }
        out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    Ok(out)
}

/// Reads the string metadata of a safetensors file.
pub fn safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Model(format!("{}: not a safetensors file: {e}", path.display())))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Vec<TensorSpec> {
        vec![
            TensorSpec {
                name: "layers.0.weight".into(),
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "layers.0.bias".into(),
                shape: vec![3],
            },
        ]
    }

    #[test]
    fn safetensors_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let v: Vec<f32> = vec![
            1.0,
            -2.5,
            3.25e-7,
            f32::MIN_POSITIVE,
            0.0,
            -0.0,
            7.0,
            8.0,
            9.0,
        ];
        let meta = HashMap::from([("round".to_string(), "3".to_string())]);
        save_safetensors(&p, &layout(), &v, meta).unwrap();
        let back = load_safetensors(&p, &layout()).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(safetensors_metadata(&p).unwrap()["round"], "3");
        assert!(!p.with_extension("safetensors.tmp").exists());
    }

    #[test]
    fn wrong_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        assert!(save_safetensors(&p, &layout(), &[1.0], HashMap::new()).is_err());
        save_safetensors(&p, &layout(), &[0.0; 9], HashMap::new()).unwrap();
        let mut other = layout();
        other[1].shape = vec![4];
        let e = load_safetensors(&p, &other).unwrap_err().to_string();
        assert!(e.contains("layers.0.bias"), "{e}");
        std::fs::write(&p, b"garbage").unwrap();
        assert!(
            load_safetensors(&p, &layout())
                .unwrap_err()
                .to_string()
                .contains("not a safetensors")
        );
    }

    #[test]
    fn digest_is_sha256_of_le_bytes() {
        let v = [1.0f32, 2.0];
        assert_eq!(digest(&v), sha256_hex(&to_le_bytes(&v)));
        assert_eq!(from_le_bytes(&to_le_bytes(&v)).unwrap(), v);
        assert!(from_le_bytes(&[0, 0, 0]).is_err());
    }
}
