//! Fuzz target: a site's CSV line data (an MES/historian export).
//!
//! The participant reads these files before anything else; a malformed file
//! must give an error that names the file, line and column, never a panic.
//! Loaded data must satisfy what training relies on: one label per row, a
//! known class, every feature finite; for a regression plan (the first byte
//! odd) one finite target per row instead.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sangsaeng_common::config::plan::{DataSchema, Task};
use sangsaeng_common::learning::data::load_csv_reader;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, text)) = data.split_first() else {
        return;
    };
    let regression = mode & 1 == 1;
    let schema = if regression {
        DataSchema {
            task: Task::Regression,
            feature_columns: vec!["a".into(), "b".into(), "c".into()],
            target_column: "fault".into(),
            ..Default::default()
        }
    } else {
        DataSchema {
            feature_columns: vec!["a".into(), "b".into(), "c".into()],
            label_column: "fault".into(),
            classes: vec!["0".into(), "1".into(), "ok".into()],
            ..Default::default()
        }
    };
    if let Ok(d) = load_csv_reader(Path::new("fuzz.csv"), text, &schema) {
        assert_eq!(d.features.len(), d.labels.len() * 3);
        assert!(d.labels.iter().all(|&l| l < 3));
        assert!(d.features.iter().all(|v| v.is_finite()));
        if regression {
            assert_eq!(d.targets.len(), d.labels.len());
            assert!(d.targets.iter().all(|v| v.is_finite()));
        } else {
            assert!(d.targets.is_empty());
        }
    }
});
