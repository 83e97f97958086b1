//! A CSV of line data to score with a trained model, read in bounded batches
//! so a file larger than memory streams through (`sangsaeng-participant
//! predict`).
//!
//! Stricter than the training reader: the header must be the plan's feature
//! columns, in the plan's order, optionally followed by the label column (to
//! score a labelled file; for a regression plan, the target column). A model applied to columns in another order, or to a
//! file with a column more or less, would give confident nonsense, so each of
//! those is refused with the column it concerns. Cells are parsed as in
//! training: NaN, infinities and text are refused with their line and column.

use std::path::{Path, PathBuf};

use crate::Result;
use crate::config::plan::{DataSchema, Task};
use crate::learning::data::{
    LabelMap, check_row_width, csv_err, data_err, parse_feature, parse_label, read_header,
};

/// An open CSV being scored batch by batch.
pub struct ScoringRows<R: std::io::Read> {
    file: PathBuf,
    rdr: csv::Reader<R>,
    header: csv::StringRecord,
    schema: DataSchema,
    has_labels: bool,
    record: csv::StringRecord,
    rows: u64,
}

impl ScoringRows<std::io::BufReader<std::fs::File>> {
    /// Opens `path` and checks its header against `schema`.
    pub fn open(path: &Path, schema: &DataSchema) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
        ScoringRows::new(path, std::io::BufReader::with_capacity(1 << 20, f), schema)
    }
}

impl<R: std::io::Read> ScoringRows<R> {
    /// Reads and checks the header of `reader` (`origin` names it in errors).
    pub fn new(origin: &Path, reader: R, schema: &DataSchema) -> Result<Self> {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(reader);
        let header = read_header(origin, &mut rdr)?;
        let has_labels = check_header(origin, &header, schema)?;
        Ok(ScoringRows {
            file: origin.to_path_buf(),
            rdr,
            header,
            schema: schema.clone(),
            has_labels,
            record: csv::StringRecord::new(),
            rows: 0,
        })
    }

    /// Whether the file carries the label (or target) column; then each
    /// batch's labels (classification) or values (regression) are filled.
    pub fn has_labels(&self) -> bool {
        self.has_labels
    }

    /// Rows read so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The next up to `max_rows` rows into `features` (and for a labelled
    /// file into `labels`, or for a regression plan into `values`, the target
    /// as written), all emptied first; returns how many (0 at the end).
    pub fn next_batch(
        &mut self,
        max_rows: usize,
        features: &mut Vec<f32>,
        labels: &mut Vec<u32>,
        values: &mut Vec<f32>,
    ) -> Result<usize> {
        features.clear();
        labels.clear();
        values.clear();
        let regression = self.schema.task == Task::Regression;
        let classes = LabelMap::new(&self.schema.classes);
        let nf = self.schema.feature_columns.len();
        let mut n = 0;
        while n < max_rows {
            match self.rdr.read_record(&mut self.record) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return Err(csv_err(&self.file, e)),
            }
            self.rows += 1;
            let line = self.record.position().map_or(self.rows + 1, |p| p.line());
            check_row_width(&self.file, line, &self.record, &self.header)?;
            for j in 0..nf {
                let name = self.schema.feature_columns[j].as_str();
                features.push(parse_feature(&self.file, line, name, &self.record[j])?);
            }
            if self.has_labels && regression {
                let cell = &self.record[nf];
                values.push(parse_feature(&self.file, line, self.schema.target(), cell)?);
            } else if self.has_labels {
                let l = parse_label(&self.file, line, &self.schema, &classes, &self.record[nf])?;
                labels.push(l);
            }
            n += 1;
        }
        if n == 0 && self.rows == 0 {
            return Err(data_err(
                &self.file,
                None,
                None,
                "the file has a header but no data rows".into(),
            ));
        }
        Ok(n)
    }
}

/// The plan's feature columns in order, then optionally its label column;
/// returns whether the label column is there.
fn check_header(file: &Path, header: &csv::StringRecord, schema: &DataSchema) -> Result<bool> {
    let cols: Vec<&str> = header.iter().map(str::trim).collect();
    let features = &schema.feature_columns;
    let missing: Vec<&String> = features
        .iter()
        .filter(|f| !cols.contains(&f.as_str()))
        .collect();
    let err = |column: Option<&str>, m: String| Err(data_err(file, Some(1), column, m));
    if !missing.is_empty() {
        return err(
            Some(missing[0]),
            format!(
                "the header lacks the model's feature column(s) {}",
                crate::learning::data::quote_list(missing.iter().copied())
            ),
        );
    }
    for (i, c) in cols.iter().enumerate() {
        let expected = match features.get(i) {
            Some(f) => f.as_str(),
            None if i == features.len() && *c == schema.target() => continue,
            None => {
                return err(
                    Some(c),
                    format!(
                        "column {} ('{c}') is not one of the model's: a file to score has the plan's {} feature columns, optionally followed by the {} '{}'",
                        i + 1,
                        features.len(),
                        schema.target_key().replace('_', " "),
                        schema.target()
                    ),
                );
            }
        };
        if *c != expected {
            return err(
                Some(c),
                format!(
                    "column {} is '{c}', but the model's column {} is '{expected}': the columns must come in the plan's order",
                    i + 1,
                    i + 1
                ),
            );
        }
    }
    Ok(cols.len() == features.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> DataSchema {
        DataSchema {
            feature_columns: vec!["a".into(), "b".into()],
            label_column: "y".into(),
            classes: vec!["ok".into(), "fault".into()],
            ..Default::default()
        }
    }

    fn rows(text: &str) -> Result<(Vec<f32>, Vec<u32>, bool)> {
        let mut r = ScoringRows::new(Path::new("line.csv"), text.as_bytes(), &schema())?;
        let (mut f, mut l) = (vec![], vec![]);
        let mut all_f = vec![];
        let mut all_l = vec![];
        while r.next_batch(2, &mut f, &mut l, &mut Vec::new())? > 0 {
            all_f.extend_from_slice(&f);
            all_l.extend_from_slice(&l);
        }
        Ok((all_f, all_l, r.has_labels()))
    }

    #[test]
    fn rows_stream_in_batches_with_or_without_labels() {
        let (f, l, labelled) = rows("a,b\n1,2\n3,4\n5,6\n").unwrap();
        assert_eq!(f, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(l.is_empty() && !labelled);
        let (f, l, labelled) = rows("a,b,y\n1,2,fault\n3,4,ok\n5,6,ok\n").unwrap();
        assert_eq!(f.len(), 6);
        assert_eq!(l, vec![1, 0, 0]);
        assert!(labelled);
    }

    #[test]
    fn missing_extra_reordered_columns_and_bad_cells_are_named() {
        for (text, needle) in [
            ("a\n1\n", "lacks the model's feature column(s) 'b'"),
            (
                "b,a\n1,2\n",
                "column 1 is 'b', but the model's column 1 is 'a'",
            ),
            ("a,b,c\n1,2,3\n", "column 3 ('c') is not one of the model's"),
            ("a,b\n1,NaN\n", "NaN and infinities are refused"),
            (
                "a,b\n1,2\n3\n",
                "the row has 1 field(s) but the header has 2",
            ),
            ("a,b,y\n1,2,maybe\n", "unknown label \"maybe\""),
            ("a,b\n", "no data rows"),
        ] {
            let e = rows(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
        let e = rows("a,b\n1,2\n3,x\n").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("b"), "{e}");
    }
}
