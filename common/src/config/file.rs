//! Reading a daemon's TOML config file: one place for the error wording (file and
//! key named, on one line) and for resolving relative paths against the file's folder.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// A parsed config file and the folder its relative paths are resolved against.
pub struct ConfigFile<T> {
    pub values: T,
    base: PathBuf,
}

impl<T> ConfigFile<T> {
    /// `p` as given if absolute, else relative to the config file's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

/// Reads and parses `path`; unknown keys are refused by the target type's serde attributes.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<ConfigFile<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let values = toml::from_str(&text).map_err(|e| {
        Error::config(
            path.display().to_string(),
            crate::config::plan::toml_message(&e),
        )
    })?;
    Ok(ConfigFile {
        values,
        base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        data: PathBuf,
    }

    #[test]
    fn relative_paths_follow_the_file_and_errors_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.toml");
        std::fs::write(&p, "data = \"x.csv\"\n").unwrap();
        let f: ConfigFile<Sample> = read(&p).unwrap();
        assert_eq!(f.resolve(&f.values.data), dir.path().join("x.csv"));
        assert_eq!(f.resolve(Path::new("/abs")), PathBuf::from("/abs"));
        std::fs::write(&p, "dta = 1\n").unwrap();
        let e = read::<Sample>(&p).err().unwrap().to_string();
        assert!(e.contains("d.toml") && e.contains("dta"), "{e}");
    }
}
