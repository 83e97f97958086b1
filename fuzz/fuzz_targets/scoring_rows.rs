//! Fuzz target: a CSV export to score (`sangsaeng-participant predict`).
//!
//! Read in batches of a random size; a malformed file must give an error that
//! names the file, line and column, never a panic. What is read must be whole
//! rows of finite features, with a known label per row when the file has the
//! label column and none otherwise.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sangsaeng_common::config::plan::DataSchema;
use sangsaeng_common::learning::scoring::ScoringRows;

fuzz_target!(|data: &[u8]| {
    let Some((&batch, text)) = data.split_first() else {
        return;
    };
    let schema = DataSchema {
        feature_columns: vec!["a".into(), "b".into(), "c".into()],
        label_column: "fault".into(),
        classes: vec!["0".into(), "1".into(), "ok".into()],
    };
    let Ok(mut rows) = ScoringRows::new(Path::new("fuzz.csv"), text, &schema) else {
        return;
    };
    let (mut f, mut l) = (Vec::new(), Vec::new());
    let batch = usize::from(batch).max(1);
    while let Ok(n) = rows.next_batch(batch, &mut f, &mut l) {
        if n == 0 {
            break;
        }
        assert!(n <= batch);
        assert_eq!(f.len(), n * 3);
        assert!(f.iter().all(|v| v.is_finite()));
        if rows.has_labels() {
            assert_eq!(l.len(), n);
            assert!(l.iter().all(|&x| x < 3));
        } else {
            assert!(l.is_empty());
        }
    }
});
