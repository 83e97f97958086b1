//! Fuzz target: a CSV export to score (`sangsaeng-participant predict`).
//!
//! Read in batches of a random size; a malformed file must give an error that
//! names the file, line and column, never a panic. What is read must be whole
//! rows of finite features, with a known label per row when the file has the
//! label column and none otherwise; for a regression plan (the first byte
//! odd) a finite target value per row instead of a label.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sangsaeng_common::config::plan::{DataSchema, Task};
use sangsaeng_common::learning::scoring::ScoringRows;

fuzz_target!(|data: &[u8]| {
    let Some((&batch, text)) = data.split_first() else {
        return;
    };
    let regression = batch & 1 == 1;
    let features = vec!["a".into(), "b".into(), "c".into()];
    let schema = if regression {
        DataSchema {
            task: Task::Regression,
            feature_columns: features,
            target_column: "fault".into(),
            ..Default::default()
        }
    } else {
        DataSchema {
            feature_columns: features,
            label_column: "fault".into(),
            classes: vec!["0".into(), "1".into(), "ok".into()],
            ..Default::default()
        }
    };
    let Ok(mut rows) = ScoringRows::new(Path::new("fuzz.csv"), text, &schema) else {
        return;
    };
    let (mut f, mut l, mut v) = (Vec::new(), Vec::new(), Vec::new());
    let batch = usize::from(batch >> 1).max(1);
    while let Ok(n) = rows.next_batch(batch, &mut f, &mut l, &mut v) {
        if n == 0 {
            break;
        }
        assert!(n <= batch);
        assert_eq!(f.len(), n * 3);
        assert!(f.iter().all(|x| x.is_finite()));
        match (rows.has_labels(), regression) {
            (true, false) => {
                assert_eq!(l.len(), n);
                assert!(l.iter().all(|&x| x < 3));
                assert!(v.is_empty());
            }
            (true, true) => {
                assert_eq!(v.len(), n);
                assert!(v.iter().all(|x| x.is_finite()));
                assert!(l.is_empty());
            }
            (false, _) => assert!(l.is_empty() && v.is_empty()),
        }
    }
});
