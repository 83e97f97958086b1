//! Line data at a site: CSV exports from the MES/historian, checked against the
//! training plan's schema, plus the federated feature statistics from which the
//! coordinator derives one global standardisation.
//!
//! Everything here runs on a participant's machine against files an operator
//! exported by hand, so every defect in a file is reported with the file, the
//! 1-based line (the header is line 1) and the column, and nothing panics on bad input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::plan::{DataSchema, Scaling, Task};
use crate::{Error, Result};

/// A site's examples, features row-major (`len() * n_features` values) and labels as class indices.
///
/// Regression rows carry their value in `targets` (one per row) and label 0:
/// every row is then one stratum of [`Dataset::split_validation`], and
/// `labels` keeps counting the rows for both tasks.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dataset {
    pub features: Vec<f32>,
    pub labels: Vec<u32>,
    pub n_features: usize,
    /// Regression: each row's target; empty for classification.
    pub targets: Vec<f32>,
    /// Regression, once standardised: the target's `(mean, std)`, so that
    /// evaluation reports MAE and RMSE in the target's own units.
    pub target_scaling: Option<(f64, f64)>,
}

/// What a participant's configuration declares about its data: the files and the
/// columns it believes they hold. Checked against the plan with [`check_schema`]
/// before anything is read, so a mismatch is reported as a configuration problem
/// rather than as a confusing error deep in a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteData {
    pub files: Vec<PathBuf>,
    pub label_column: String,
    pub feature_columns: Vec<String>,
}

impl SiteData {
    /// Checks the declared columns against the plan, then loads the files.
    pub fn load(&self, schema: &DataSchema) -> Result<Dataset> {
        check_schema(&self.label_column, &self.feature_columns, schema)?;
        load_csvs(&self.files, schema)
    }
}

/// Compares a site's declared columns with the plan's and names every difference:
/// a different label column, missing or extra feature columns, duplicates, or the
/// same columns in a different order (the model consumes features by position, so
/// order matters even when the set is right).
pub fn check_schema(site_label: &str, site_features: &[String], plan: &DataSchema) -> Result<()> {
    let mut problems = Vec::new();
    if site_label != plan.target() {
        let what = match plan.task {
            Task::Classification => "label column",
            Task::Regression => "target column",
        };
        problems.push(format!(
            "{what} is '{site_label}' here but '{}' in the plan",
            plan.target()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let duplicates: Vec<&String> = site_features.iter().filter(|c| !seen.insert(*c)).collect();
    if !duplicates.is_empty() {
        problems.push(format!(
            "feature column(s) listed more than once: {}",
            quote_list(duplicates)
        ));
    }
    let missing: Vec<&String> = plan
        .feature_columns
        .iter()
        .filter(|c| !site_features.contains(c))
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "missing feature column(s) the plan requires: {}",
            quote_list(missing.iter().copied())
        ));
    }
    let extra: Vec<&String> = site_features
        .iter()
        .filter(|c| !plan.feature_columns.contains(c))
        .collect();
    if !extra.is_empty() {
        problems.push(format!(
            "extra feature column(s) not in the plan: {}",
            quote_list(extra.iter().copied())
        ));
    }
    // Order is only worth reporting when the sets agree; otherwise the missing/extra
    // messages above already explain the difference.
    if problems.is_empty()
        && let Some((i, (here, there))) = site_features
            .iter()
            .zip(&plan.feature_columns)
            .enumerate()
            .find(|(_, (a, b))| a != b)
    {
        problems.push(format!(
            "feature columns are in a different order: position {} is '{here}' here but '{there}' in the plan (plan order: {})",
            i + 1,
            quote_list(&plan.feature_columns)
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Schema(problems.join("; ")))
    }
}

pub(crate) fn quote_list<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    items
        .into_iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn data_err(
    file: &Path,
    line: Option<u64>,
    column: Option<&str>,
    message: String,
) -> Error {
    Error::Data {
        file: file.display().to_string(),
        line,
        column: column.map(str::to_owned),
        message,
    }
}

/// Converts a csv error into ours, keeping the position csv knows.
pub(crate) fn csv_err(file: &Path, e: csv::Error) -> Error {
    let line = e.position().map(|p| p.line());
    let message = e.to_string();
    match e.into_kind() {
        csv::ErrorKind::Io(io) => Error::io(file, io),
        _ => data_err(file, line, None, message),
    }
}

/// Maps a label cell to a class index. Exact (trimmed) text wins; otherwise
/// numeric equality is accepted because spreadsheets and historians routinely
/// rewrite an integer class `1` as `1.0`.
pub(crate) struct LabelMap<'a> {
    exact: HashMap<&'a str, u32>,
    numeric: Vec<(f64, u32)>,
}

impl<'a> LabelMap<'a> {
    pub(crate) fn new(classes: &'a [String]) -> Self {
        let mut exact = HashMap::new();
        let mut numeric = Vec::new();
        for (i, c) in classes.iter().enumerate() {
            // The plan caps classes far below u32::MAX, so the index always fits.
            let idx = i as u32;
            exact.entry(c.trim()).or_insert(idx);
            if let Ok(v) = c.trim().parse::<f64>()
                && v.is_finite()
            {
                numeric.push((v, idx));
            }
        }
        LabelMap { exact, numeric }
    }

    fn get(&self, cell: &str) -> Option<u32> {
        let cell = cell.trim();
        if let Some(&i) = self.exact.get(cell) {
            return Some(i);
        }
        let v = cell.parse::<f64>().ok().filter(|v| v.is_finite())?;
        self.numeric.iter().find(|(c, _)| *c == v).map(|&(_, i)| i)
    }
}

/// Reads CSV files (header row required) into one dataset with the plan's feature
/// columns in the plan's order. Columns are found by name, so the export may hold
/// them in any order and may carry extra columns, which are ignored.
///
/// Refused, with file, line and column: an empty file or one with no data rows, a
/// required column missing from the header (the available ones are listed) or
/// present twice, a row with a different number of fields than the header, a
/// feature cell that is not a number, is NaN or infinite or does not fit in an
/// `f32`, and a label that is none of the plan's classes.
///
/// Rows are streamed; a file is never held in memory as text.
pub fn load_csvs(files: &[PathBuf], schema: &DataSchema) -> Result<Dataset> {
    if files.is_empty() {
        return Err(Error::Data {
            file: "(no files)".into(),
            line: None,
            column: None,
            message: "no CSV data files were given".into(),
        });
    }
    let mut out = Dataset {
        n_features: schema.feature_columns.len(),
        ..Dataset::default()
    };
    let labels = LabelMap::new(&schema.classes);
    for file in files {
        load_one(file, schema, &labels, &mut out)?;
    }
    Ok(out)
}

/// Reads CSV text from any reader with the same checks as [`load_csvs`];
/// `origin` only names the source in errors. This is the entry point the CSV
/// fuzz target drives (`fuzz/fuzz_targets/csv_rows.rs`).
pub fn load_csv_reader(
    origin: &Path,
    reader: impl std::io::Read,
    schema: &DataSchema,
) -> Result<Dataset> {
    let mut out = Dataset {
        n_features: schema.feature_columns.len(),
        ..Dataset::default()
    };
    load_reader(
        origin,
        reader,
        schema,
        &LabelMap::new(&schema.classes),
        &mut out,
    )?;
    Ok(out)
}

fn load_one(file: &Path, schema: &DataSchema, labels: &LabelMap, out: &mut Dataset) -> Result<()> {
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    load_reader(file, std::io::BufReader::new(f), schema, labels, out)
}

fn load_reader(
    file: &Path,
    reader: impl std::io::Read,
    schema: &DataSchema,
    labels: &LabelMap,
    out: &mut Dataset,
) -> Result<()> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        // Ragged rows are checked by hand below so the error names the line in our words.
        .flexible(true)
        .from_reader(reader);
    let header = read_header(file, &mut rdr)?;
    let feature_idx = schema
        .feature_columns
        .iter()
        .map(|c| column_index(file, &header, schema, c))
        .collect::<Result<Vec<_>>>()?;
    let label_idx = column_index(file, &header, schema, schema.target())?;
    let regression = schema.task == Task::Regression;

    let mut record = csv::StringRecord::new();
    let mut rows: u64 = 0;
    loop {
        match rdr.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_err(file, e)),
        }
        rows += 1;
        // csv knows the physical line (quoted fields may span lines); the row count
        // plus the header is the fallback.
        let line = record.position().map_or(rows + 1, |p| p.line());
        check_row_width(file, line, &record, &header)?;
        for (j, &col) in feature_idx.iter().enumerate() {
            let cell = &record[col];
            let name = schema.feature_columns[j].as_str();
            out.features.push(parse_feature(file, line, name, cell)?);
        }
        if regression {
            let cell = &record[label_idx];
            out.targets
                .push(parse_feature(file, line, schema.target(), cell)?);
            out.labels.push(0);
        } else {
            let label = parse_label(file, line, schema, labels, &record[label_idx])?;
            out.labels.push(label);
        }
    }
    if rows == 0 {
        return Err(data_err(
            file,
            None,
            None,
            "the file has a header but no data rows".into(),
        ));
    }
    Ok(())
}

/// A row must have as many fields as the header: the reader is `flexible` so
/// that this error, not csv's, names the line.
pub(crate) fn check_row_width(
    file: &Path,
    line: u64,
    record: &csv::StringRecord,
    header: &csv::StringRecord,
) -> Result<()> {
    if record.len() != header.len() {
        return Err(data_err(
            file,
            Some(line),
            None,
            format!(
                "the row has {} field(s) but the header has {}",
                record.len(),
                header.len()
            ),
        ));
    }
    Ok(())
}

/// The header row; a file without one is refused here, before any column is
/// looked up, so the error says the file is empty rather than a column missing.
pub(crate) fn read_header<R: std::io::Read>(
    file: &Path,
    rdr: &mut csv::Reader<R>,
) -> Result<csv::StringRecord> {
    let header = rdr.headers().map_err(|e| csv_err(file, e))?.clone();
    if header.is_empty() || (header.len() == 1 && header[0].trim().is_empty()) {
        return Err(data_err(
            file,
            None,
            None,
            "the file is empty: expected a header row and data rows".into(),
        ));
    }
    Ok(header)
}

/// The position of column `name` in the header. Columns are found by name, so
/// extra columns and any order are fine; a missing column's error lists every
/// missing one and what is available, a duplicated one's its positions.
fn column_index(
    file: &Path,
    header: &csv::StringRecord,
    schema: &DataSchema,
    name: &str,
) -> Result<usize> {
    let hits: Vec<usize> = header
        .iter()
        .enumerate()
        .filter(|(_, h)| h.trim() == name)
        .map(|(i, _)| i)
        .collect();
    match hits.as_slice() {
        [i] => Ok(*i),
        [] => {
            let wanted = schema
                .feature_columns
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(schema.target()));
            let missing: Vec<String> = wanted
                .filter(|w| !header.iter().any(|h| h.trim() == *w))
                .map(str::to_owned)
                .collect();
            Err(data_err(
                file,
                Some(1),
                Some(name),
                format!(
                    "the header lacks column(s) {}; available columns: {}",
                    quote_list(&missing),
                    header
                        .iter()
                        .map(|h| format!("'{}'", h.trim()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
        many => Err(data_err(
            file,
            Some(1),
            Some(name),
            format!(
                "the column appears {} times in the header (positions {}), so it is ambiguous",
                many.len(),
                many.iter()
                    .map(|i| (i + 1).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// A label cell as its class index; a label the plan does not know is refused
/// with the plan's classes, so a site sees what it should have written.
pub(crate) fn parse_label(
    file: &Path,
    line: u64,
    schema: &DataSchema,
    labels: &LabelMap,
    cell: &str,
) -> Result<u32> {
    labels.get(cell).ok_or_else(|| {
        data_err(
            file,
            Some(line),
            Some(&schema.label_column),
            format!(
                "unknown label \"{cell}\"; the plan's classes are: {}",
                quote_list(&schema.classes)
            ),
        )
    })
}

pub(crate) fn parse_feature(file: &Path, line: u64, column: &str, cell: &str) -> Result<f32> {
    let err = |message: String| data_err(file, Some(line), Some(column), message);
    let v: f64 = cell
        .trim()
        .parse()
        .map_err(|_| err(format!("\"{cell}\" is not a number")))?;
    if !v.is_finite() {
        return Err(err(format!(
            "\"{cell}\" is not a finite number (NaN and infinities are refused)"
        )));
    }
    if v.abs() > f64::from(f32::MAX) {
        return Err(err(format!(
            "\"{cell}\" is outside the range of a 32-bit float (about ±3.4e38)"
        )));
    }
    Ok(v as f32)
}

/// Writes a dataset as CSV: the plan's feature columns then its label column,
/// labels written as the class text. Used to hand each example firm its own split.
pub fn write_csv(path: &Path, dataset: &Dataset, schema: &DataSchema) -> Result<()> {
    let d = schema.feature_columns.len();
    if dataset.n_features != d || dataset.features.len() != dataset.len() * d {
        return Err(Error::Schema(format!(
            "cannot write {}: the dataset has {} features per row ({} values for {} rows) but the plan has {d}",
            path.display(),
            dataset.n_features,
            dataset.features.len(),
            dataset.len()
        )));
    }
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = csv::Writer::from_writer(std::io::BufWriter::new(file));
    let header = schema
        .feature_columns
        .iter()
        .map(String::as_str)
        .chain(std::iter::once(schema.target()));
    w.write_record(header).map_err(|e| csv_err(path, e))?;
    let regression = schema.task == Task::Regression;
    if regression && dataset.targets.len() != dataset.len() {
        return Err(Error::Schema(format!(
            "cannot write {}: a regression dataset needs one target per row ({} for {} rows)",
            path.display(),
            dataset.targets.len(),
            dataset.len()
        )));
    }
    let mut fields: Vec<String> = Vec::with_capacity(d + 1);
    for i in 0..dataset.len() {
        fields.clear();
        // `{}` on f32 prints the shortest text that reads back to the same value.
        fields.extend(dataset.row(i).iter().map(|v| v.to_string()));
        if regression {
            fields.push(dataset.targets[i].to_string());
            w.write_record(&fields).map_err(|e| csv_err(path, e))?;
            continue;
        }
        let class = schema
            .classes
            .get(dataset.labels[i] as usize)
            .ok_or_else(|| {
                Error::Schema(format!(
                    "cannot write {}: row {} has class index {} but the plan has {} classes",
                    path.display(),
                    i + 1,
                    dataset.labels[i],
                    schema.classes.len()
                ))
            })?;
        fields.push(class.clone());
        w.write_record(&fields).map_err(|e| csv_err(path, e))?;
    }
    w.flush().map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// Per-feature sufficient statistics of a site's data. Sites send these instead of
/// rows; sums merge exactly in any order, so the coordinator obtains the global
/// mean and standard deviation without seeing data.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FeatureStats {
    pub count: u64,
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
}

impl FeatureStats {
    /// Statistics of nothing, the neutral element of [`FeatureStats::merge`].
    pub fn empty(n_features: usize) -> Self {
        FeatureStats {
            count: 0,
            sum: vec![0.0; n_features],
            sum_sq: vec![0.0; n_features],
        }
    }

    /// Sums over a dataset, accumulated in f64: one column per feature, then
    /// (regression) one for the target.
    pub fn of(data: &Dataset) -> Self {
        let d = data.n_features;
        let with_target = !data.targets.is_empty();
        let mut s = Self::empty(d + usize::from(with_target));
        if d == 0 {
            return s;
        }
        for (i, row) in data.features.chunks_exact(d).enumerate() {
            let target = data.targets.get(i).copied();
            for (j, &x) in row.iter().chain(target.as_ref()).enumerate() {
                let x = f64::from(x);
                s.sum[j] += x;
                s.sum_sq[j] += x * x;
            }
        }
        s.count = data.len() as u64;
        s
    }

    /// Adds another site's statistics to these.
    pub fn merge(&mut self, other: &FeatureStats) -> Result<()> {
        if other.sum.len() != self.sum.len() || other.sum_sq.len() != self.sum_sq.len() {
            return Err(Error::Aggregation(format!(
                "feature statistics have {} features but {} were expected",
                other.sum.len(),
                self.sum.len()
            )));
        }
        self.count = self
            .count
            .checked_add(other.count)
            .ok_or_else(|| Error::Aggregation("feature statistics: row count overflows".into()))?;
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        for (a, b) in self.sum_sq.iter_mut().zip(&other.sum_sq) {
            *a += b;
        }
        Ok(())
    }

    /// Checks statistics received from elsewhere before they are merged: right
    /// length, at least one row, finite sums and non-negative sums of squares.
    pub fn validate(&self, n_features: usize) -> Result<()> {
        if self.sum.len() != n_features || self.sum_sq.len() != n_features {
            return Err(Error::Aggregation(format!(
                "feature statistics: expected {n_features} sums and sums of squares, got {} and {}",
                self.sum.len(),
                self.sum_sq.len()
            )));
        }
        if self.count == 0 {
            return Err(Error::Aggregation(
                "feature statistics: computed over zero rows".into(),
            ));
        }
        if let Some(j) = self.sum.iter().position(|v| !v.is_finite()) {
            return Err(Error::Aggregation(format!(
                "feature statistics: sum of feature {} is not finite",
                j + 1
            )));
        }
        if let Some(j) = self
            .sum_sq
            .iter()
            .position(|v| !(v.is_finite() && *v >= 0.0))
        {
            return Err(Error::Aggregation(format!(
                "feature statistics: sum of squares of feature {} is negative or not finite",
                j + 1
            )));
        }
        Ok(())
    }

    /// Global mean and population standard deviation.
    ///
    /// A feature whose deviation is zero, within rounding of the one-pass formula,
    /// or not finite gets std 1.0: a constant sensor (a setpoint, a valve held
    /// closed) is common in line data and must not cause a division by zero. With
    /// std 1.0 such a feature standardises to (x - mean), i.e. to 0 on the data seen.
    ///
    /// With `regression` the last column is the target's, which becomes
    /// [`Scaling::target_mean`] and [`Scaling::target_std`].
    pub fn to_scaling(&self, regression: bool) -> Result<Scaling> {
        self.validate(self.sum.len())?;
        if regression && self.sum.len() < 2 {
            return Err(Error::Aggregation(
                "feature statistics: a regression plan needs the features' and the target's sums"
                    .into(),
            ));
        }
        let n = self.count as f64;
        let mut mean = Vec::with_capacity(self.sum.len());
        let mut std = Vec::with_capacity(self.sum.len());
        for (&s, &sq) in self.sum.iter().zip(&self.sum_sq) {
            let m = s / n;
            let mean_sq = sq / n;
            let var = mean_sq - m * m;
            // E[x²] − mean² cancels catastrophically for a constant sensor at a large
            // level (e.g. a pressure near 2700): the difference is then rounding noise
            // of order n·ε·E[x²], not a real spread, and must count as zero.
            let noise = 4.0 * n * f64::EPSILON * mean_sq;
            let sd = if var > noise { var.sqrt() } else { 0.0 };
            mean.push(m);
            std.push(if sd.is_finite() && sd >= 1e-12 {
                sd
            } else {
                1.0
            });
        }
        let (target_mean, target_std) = if regression {
            (mean.pop(), std.pop())
        } else {
            (None, None)
        };
        Ok(Scaling {
            mean,
            std,
            target_mean,
            target_std,
        })
    }
}

impl Dataset {
    /// The features of row `i`. Panics if `i >= len()`, like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        let d = self.n_features;
        &self.features[i * d..(i + 1) * d]
    }

    /// Number of rows of each class; labels at or above `n_classes` are not
    /// counted (they cannot come from [`load_csvs`], which maps to the plan's classes).
    pub fn class_counts(&self, n_classes: usize) -> Vec<usize> {
        let mut counts = vec![0usize; n_classes];
        for &l in &self.labels {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        counts
    }

    /// Applies `(x - mean) / std` to every feature. The data is left unchanged on error.
    pub fn standardise(&mut self, scaling: &Scaling) -> Result<()> {
        let d = self.n_features;
        if scaling.mean.len() != d || scaling.std.len() != d {
            return Err(Error::Schema(format!(
                "scaling has {} means and {} stds but the data has {d} features",
                scaling.mean.len(),
                scaling.std.len()
            )));
        }
        if let Some(j) = (0..d).find(|&j| {
            !(scaling.mean[j].is_finite() && scaling.std[j].is_finite() && scaling.std[j] > 0.0)
        }) {
            return Err(Error::Schema(format!(
                "scaling of feature {} is unusable (mean {}, std {})",
                j + 1,
                scaling.mean[j],
                scaling.std[j]
            )));
        }
        let mut scaled = Vec::with_capacity(self.features.len());
        for (k, &x) in self.features.iter().enumerate() {
            let j = k % d;
            let v = ((f64::from(x) - scaling.mean[j]) / scaling.std[j]) as f32;
            if !v.is_finite() {
                return Err(Error::Schema(format!(
                    "standardising row {} feature {} overflows a 32-bit float (value {x}, mean {}, std {})",
                    k / d + 1,
                    j + 1,
                    scaling.mean[j],
                    scaling.std[j]
                )));
            }
            scaled.push(v);
        }
        let targets = self.standardised_targets(scaling)?;
        self.features = scaled;
        if let Some(t) = targets {
            self.targets = t;
            self.target_scaling = scaling.target();
        }
        Ok(())
    }

    /// The targets as `(y - mean) / std`; `None` for classification data.
    fn standardised_targets(&self, scaling: &Scaling) -> Result<Option<Vec<f32>>> {
        if self.targets.is_empty() {
            return Ok(None);
        }
        if self.target_scaling.is_some() {
            return Err(Error::Schema("the targets are already standardised".into()));
        }
        let Some((mean, std)) = scaling.target() else {
            return Err(Error::Schema(
                "the data has regression targets but the scaling has no target mean and std".into(),
            ));
        };
        if !(mean.is_finite() && std.is_finite() && std > 0.0) {
            return Err(Error::Schema(format!(
                "the target's scaling is unusable (mean {mean}, std {std})"
            )));
        }
        self.targets
            .iter()
            .enumerate()
            .map(|(i, &y)| {
                let v = ((f64::from(y) - mean) / std) as f32;
                if v.is_finite() {
                    Ok(v)
                } else {
                    Err(Error::Schema(format!(
                        "standardising row {}'s target overflows a 32-bit float (value {y}, mean {mean}, std {std})",
                        i + 1
                    )))
                }
            })
            .collect::<Result<Vec<f32>>>()
            .map(Some)
    }

    /// A standardised target value in the target's own units.
    pub fn target_in_units(&self, standardised: f64) -> f64 {
        match self.target_scaling {
            Some((mean, std)) => standardised * std + mean,
            None => standardised,
        }
    }

    /// Splits off a validation set, deterministically for a given seed and
    /// stratified per class: each class contributes `round(fraction · n)` of its
    /// rows, but at least one and at most `n - 1` when it has two or more rows, so
    /// rare failure modes are both trained on and validated. A class with a single
    /// row stays in training. Rows keep their original order within each part.
    ///
    /// `fraction <= 0` (or NaN) gives an empty validation set, `fraction >= 1` an
    /// empty training set. Returns `(training, validation)`.
    pub fn split_validation(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let mut by_class: Vec<Vec<usize>> = Vec::new();
        for (i, &l) in self.labels.iter().enumerate() {
            let l = l as usize;
            if by_class.len() <= l {
                by_class.resize_with(l + 1, Vec::new);
            }
            by_class[l].push(i);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut is_val = vec![false; self.len()];
        for rows in &mut by_class {
            let n = rows.len();
            let k = if fraction.is_nan() || fraction <= 0.0 {
                0
            } else if fraction >= 1.0 {
                n
            } else {
                let k = (fraction * n as f64).round() as usize;
                if n >= 2 { k.clamp(1, n - 1) } else { 0 }
            };
            // Classes are visited in index order and shuffled from one stream, so the
            // split depends only on the seed and the labels.
            rows.shuffle(&mut rng);
            for &i in &rows[..k] {
                is_val[i] = true;
            }
        }
        let d = self.n_features;
        let empty = || Dataset {
            n_features: d,
            target_scaling: self.target_scaling,
            ..Dataset::default()
        };
        let (mut train, mut val) = (empty(), empty());
        for (i, &v) in is_val.iter().enumerate() {
            let part = if v { &mut val } else { &mut train };
            part.features.extend_from_slice(self.row(i));
            part.labels.push(self.labels[i]);
            if let Some(&y) = self.targets.get(i) {
                part.targets.push(y);
            }
        }
        (train, val)
    }

    /// Joins datasets end to end. All parts must have the same number of features;
    /// joining no parts gives an empty dataset with zero features.
    pub fn concat(parts: &[Dataset]) -> Result<Dataset> {
        let Some(first) = parts.first() else {
            return Ok(Dataset::default());
        };
        let d = first.n_features;
        let mut out = Dataset {
            n_features: d,
            target_scaling: first.target_scaling,
            ..Dataset::default()
        };
        for (i, p) in parts.iter().enumerate() {
            if p.targets.is_empty() != first.targets.is_empty()
                || p.target_scaling != first.target_scaling
            {
                return Err(Error::Schema(format!(
                    "cannot join datasets: part {} differs from part 1 in its regression targets or their scaling",
                    i + 1
                )));
            }
            if p.n_features != d {
                return Err(Error::Schema(format!(
                    "cannot join datasets: part 1 has {d} features but part {} has {}",
                    i + 1,
                    p.n_features
                )));
            }
            if p.features.len() != p.len() * d {
                return Err(Error::Schema(format!(
                    "cannot join datasets: part {} holds {} values for {} rows of {d} features",
                    i + 1,
                    p.features.len(),
                    p.len()
                )));
            }
            out.features.extend_from_slice(&p.features);
            out.labels.extend_from_slice(&p.labels);
            out.targets.extend_from_slice(&p.targets);
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn schema() -> DataSchema {
        DataSchema {
            feature_columns: vec!["a".into(), "b".into()],
            label_column: "y".into(),
            classes: vec!["0".into(), "1".into(), "fault".into()],
            ..Default::default()
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Writes `text` to a fresh temporary file named `name`.
    fn csv_file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        path
    }

    /// Loads one inline CSV and returns the error, which each bad-input test expects.
    fn load_err(text: &str) -> Error {
        let dir = tempfile::tempdir().unwrap();
        let p = csv_file(&dir, "site.csv", text);
        load_csvs(&[p], &schema()).unwrap_err()
    }

    fn data_parts(e: &Error) -> (String, Option<u64>, Option<String>, String) {
        match e {
            Error::Data {
                file,
                line,
                column,
                message,
            } => (file.clone(), *line, column.clone(), message.clone()),
            other => panic!("expected a data error, got {other:?}"),
        }
    }

    fn dataset(rows: &[(&[f32], u32)]) -> Dataset {
        let n_features = rows.first().map_or(0, |r| r.0.len());
        Dataset {
            features: rows.iter().flat_map(|r| r.0.iter().copied()).collect(),
            labels: rows.iter().map(|r| r.1).collect(),
            n_features,
            ..Default::default()
        }
    }

    // --- check_schema ---------------------------------------------------------

    #[test]
    fn schema_check_accepts_identical_columns() {
        check_schema("y", &strings(&["a", "b"]), &schema()).unwrap();
    }

    #[test]
    fn schema_check_names_a_missing_feature() {
        let e = check_schema("y", &strings(&["a"]), &schema())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing feature column(s) the plan requires: 'b'"),
            "{e}"
        );
    }

    #[test]
    fn schema_check_names_an_extra_feature() {
        let e = check_schema("y", &strings(&["a", "b", "c"]), &schema())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("extra feature column(s) not in the plan: 'c'"),
            "{e}"
        );
        assert!(!e.contains("missing"), "{e}");
    }

    #[test]
    fn schema_check_names_a_different_order() {
        let e = check_schema("y", &strings(&["b", "a"]), &schema())
            .unwrap_err()
            .to_string();
        assert!(e.contains("different order"), "{e}");
        assert!(
            e.contains("position 1 is 'b' here but 'a' in the plan"),
            "{e}"
        );
    }

    #[test]
    fn schema_check_names_a_different_label_column() {
        let e = check_schema("label", &strings(&["a", "b"]), &schema())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("label column is 'label' here but 'y' in the plan"),
            "{e}"
        );
    }

    #[test]
    fn schema_check_names_duplicates_and_reports_all_problems() {
        let e = check_schema("z", &strings(&["a", "a"]), &schema())
            .unwrap_err()
            .to_string();
        assert!(e.contains("listed more than once: 'a'"), "{e}");
        assert!(
            e.contains("missing feature column(s) the plan requires: 'b'"),
            "{e}"
        );
        assert!(e.contains("label column is 'z'"), "{e}");
    }

    #[test]
    fn site_data_load_checks_schema_first() {
        let site = SiteData {
            files: vec![PathBuf::from("/nonexistent.csv")],
            label_column: "y".into(),
            feature_columns: strings(&["b", "a"]),
        };
        assert!(matches!(site.load(&schema()), Err(Error::Schema(_))));
    }

    // --- load_csvs: good input --------------------------------------------------

    #[test]
    fn loads_columns_by_name_ignoring_extras_and_order() {
        let d = tempfile::tempdir().unwrap();
        let p = csv_file(
            &d,
            "s.csv",
            "time,b,y,a,note\n t1 , 2.5 , 1 , -1 ,x\nt2,1e3,fault,0.125,\"q,r\"\nt3,0,1.0,7,z\n",
        );
        let ds = load_csvs(&[p], &schema()).unwrap();
        assert_eq!(ds.n_features, 2);
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.row(0), &[-1.0, 2.5]);
        assert_eq!(ds.row(1), &[0.125, 1000.0]);
        assert_eq!(ds.row(2), &[7.0, 0.0]);
        // "1.0" matches class "1" numerically.
        assert_eq!(ds.labels, vec![1, 2, 1]);
    }

    #[test]
    fn loads_several_files_in_order_and_skips_a_bom() {
        let d = tempfile::tempdir().unwrap();
        let p1 = csv_file(&d, "1.csv", "\u{feff}a,b,y\n1,2,0\n");
        let p2 = csv_file(&d, "2.csv", "y,b,a\n1,4,3\n0,6,5\n");
        let ds = load_csvs(&[p1, p2], &schema()).unwrap();
        assert_eq!(ds.features, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(ds.labels, vec![0, 1, 0]);
    }

    #[test]
    fn loads_the_tennessee_eastman_csv_format() {
        // Same shape as examples/data/tennessee-eastman/*.csv, truncated to a few rows.
        let mut header: Vec<String> = (1..=41).map(|i| format!("xmeas_{i}")).collect();
        header.extend((1..=11).map(|i| format!("xmv_{i}")));
        let te = DataSchema {
            feature_columns: header.clone(),
            label_column: "fault".into(),
            classes: strings(&["0", "1", "2", "4", "5", "6", "7", "11", "14"]),
            ..Default::default()
        };
        let mut text = header.join(",") + ",fault\n";
        for (r, label) in [(0, "0"), (1, "11"), (2, "14")] {
            let cells: Vec<String> = (0..52)
                .map(|j| format!("{}", 0.24987 + 3641.3 * f64::from(j) + f64::from(r)))
                .collect();
            text += &(cells.join(",") + "," + label + "\n");
        }
        text += &(vec!["2.3766e-05"; 52].join(",") + ",4\n");
        let d = tempfile::tempdir().unwrap();
        let p = csv_file(&d, "train.csv", &text);
        let ds = load_csvs(&[p], &te).unwrap();
        assert_eq!(ds.n_features, 52);
        assert_eq!(ds.labels, vec![0, 7, 8, 3]);
        assert_eq!(ds.row(1)[0], 1.24987);
        assert_eq!(ds.row(3)[51], 2.3766e-05);
    }

    #[test]
    fn the_shipped_tennessee_eastman_subset_loads() {
        // The example's data must stay loadable with the schema the example uses.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/tennessee-eastman");
        let mut features: Vec<String> = (1..=41).map(|i| format!("xmeas_{i}")).collect();
        features.extend((1..=11).map(|i| format!("xmv_{i}")));
        let te = DataSchema {
            feature_columns: features,
            label_column: "fault".into(),
            classes: strings(&["0", "1", "2", "4", "5", "6", "7", "11", "14"]),
            ..Default::default()
        };
        let train = load_csvs(&[dir.join("train.csv")], &te).unwrap();
        assert_eq!(
            train.class_counts(9),
            vec![500, 480, 480, 480, 480, 480, 480, 480, 480]
        );
        let test = load_csvs(&[dir.join("test.csv")], &te).unwrap();
        assert_eq!(
            test.class_counts(9),
            vec![2240, 800, 800, 800, 800, 800, 800, 800, 800]
        );
    }

    // --- load_csvs: bad input ---------------------------------------------------

    #[test]
    fn missing_column_lists_available_columns() {
        let e = load_err("a,c,y\n1,2,0\n");
        let (file, line, column, msg) = data_parts(&e);
        assert!(file.ends_with("site.csv"), "{file}");
        assert_eq!(line, Some(1));
        assert_eq!(column.as_deref(), Some("b"));
        assert!(
            msg.contains("'b'") && msg.contains("available columns: 'a', 'c', 'y'"),
            "{msg}"
        );
        let shown = e.to_string();
        assert!(shown.contains("site.csv, line 1, column 'b'"), "{shown}");
    }

    #[test]
    fn missing_label_column_is_reported() {
        let (_, line, column, _) = data_parts(&load_err("a,b\n1,2\n"));
        assert_eq!(line, Some(1));
        assert_eq!(column.as_deref(), Some("y"));
    }

    #[test]
    fn duplicate_required_column_is_refused() {
        let (_, line, column, msg) = data_parts(&load_err("a,b,a,y\n1,2,3,0\n"));
        assert_eq!(line, Some(1));
        assert_eq!(column.as_deref(), Some("a"));
        assert!(msg.contains("positions 1, 3"), "{msg}");
    }

    #[test]
    fn non_numeric_cell_is_quoted_with_line_and_column() {
        let (_, line, column, msg) = data_parts(&load_err("a,b,y\n1,2,0\n1,n/a,1\n"));
        assert_eq!(line, Some(3));
        assert_eq!(column.as_deref(), Some("b"));
        assert!(msg.contains("\"n/a\" is not a number"), "{msg}");
    }

    #[test]
    fn empty_cell_is_refused() {
        let (_, line, column, msg) = data_parts(&load_err("a,b,y\n,2,0\n"));
        assert_eq!(line, Some(2));
        assert_eq!(column.as_deref(), Some("a"));
        assert!(msg.contains("\"\" is not a number"), "{msg}");
    }

    #[test]
    fn nan_and_infinite_cells_are_refused() {
        for cell in ["NaN", "nan", "inf", "-infinity", "1e400"] {
            let (_, line, column, msg) = data_parts(&load_err(&format!("a,b,y\n1,{cell},0\n")));
            assert_eq!(line, Some(2), "{cell}");
            assert_eq!(column.as_deref(), Some("b"), "{cell}");
            assert!(msg.contains("not a finite number"), "{cell}: {msg}");
        }
    }

    #[test]
    fn value_outside_f32_range_is_refused() {
        let (_, line, column, msg) = data_parts(&load_err("a,b,y\n-1e39,2,0\n"));
        assert_eq!(line, Some(2));
        assert_eq!(column.as_deref(), Some("a"));
        assert!(msg.contains("32-bit float"), "{msg}");
    }

    #[test]
    fn empty_file_is_refused() {
        let (_, line, _, msg) = data_parts(&load_err(""));
        assert_eq!(line, None);
        assert!(msg.contains("empty"), "{msg}");
    }

    #[test]
    fn header_only_file_is_refused() {
        let (_, _, _, msg) = data_parts(&load_err("a,b,y\n"));
        assert!(msg.contains("no data rows"), "{msg}");
    }

    fn regression_schema() -> DataSchema {
        DataSchema {
            task: Task::Regression,
            feature_columns: strings(&["a", "b"]),
            target_column: "y".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_regression_target_is_read_standardised_with_the_features_and_split() {
        let text = "a,b,y\n1,2,10\n3,4,20\n5,6,30\n7,8,40\n";
        let ds =
            load_csv_reader(Path::new("t.csv"), text.as_bytes(), &regression_schema()).unwrap();
        assert_eq!(ds.targets, vec![10.0, 20.0, 30.0, 40.0]);
        assert_eq!(ds.labels, vec![0; 4]);
        let stats = FeatureStats::of(&ds);
        assert_eq!(stats.sum, vec![16.0, 20.0, 100.0]);
        let sc = stats.to_scaling(true).unwrap();
        assert_eq!(sc.mean, vec![4.0, 5.0]);
        assert_eq!(sc.target_mean, Some(25.0));
        let mut scaled = ds.clone();
        scaled.standardise(&sc).unwrap();
        let sd = sc.target_std.unwrap();
        assert!((f64::from(scaled.targets[0]) - (10.0 - 25.0) / sd).abs() < 1e-6);
        assert!((scaled.target_in_units(f64::from(scaled.targets[3])) - 40.0).abs() < 1e-4);
        let (train, val) = scaled.split_validation(0.5, 1);
        assert_eq!((train.targets.len(), val.targets.len()), (2, 2));
        assert_eq!(val.target_scaling, scaled.target_scaling);
        // Standardising twice would silently shrink the target: refused.
        assert!(scaled.standardise(&sc).is_err());
    }

    #[test]
    fn a_non_numeric_target_names_its_line_and_column() {
        let text = "a,b,y\n1,2,10\n3,4,high\n";
        let e = load_csv_reader(Path::new("t.csv"), text.as_bytes(), &regression_schema())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3, column 'y'"), "{e}");
        assert!(e.contains("\"high\" is not a number"), "{e}");
        let text = "a,b,y\n1,2,NaN\n";
        let e = load_csv_reader(Path::new("t.csv"), text.as_bytes(), &regression_schema())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a finite number"), "{e}");
    }

    #[test]
    fn unknown_label_lists_the_classes() {
        let (_, line, column, msg) = data_parts(&load_err("a,b,y\n1,2,0\n1,2,3\n"));
        assert_eq!(line, Some(3));
        assert_eq!(column.as_deref(), Some("y"));
        assert!(msg.contains("unknown label \"3\""), "{msg}");
        assert!(msg.contains("'0', '1', 'fault'"), "{msg}");
    }

    #[test]
    fn ragged_rows_are_refused() {
        for text in ["a,b,y\n1,2,0\n1,2\n", "a,b,y\n1,2,0\n1,2,0,9\n"] {
            let (_, line, column, msg) = data_parts(&load_err(text));
            assert_eq!(line, Some(3), "{text}");
            assert_eq!(column, None);
            assert!(msg.contains("the header has 3"), "{msg}");
        }
    }

    #[test]
    fn line_numbers_follow_quoted_multiline_fields() {
        // The quoted field spans lines 2-3, so the bad row starts on line 4.
        let (_, line, ..) = data_parts(&load_err("a,b,y,note\n1,2,0,\"two\nlines\"\nx,2,0,\n"));
        assert_eq!(line, Some(4));
    }

    #[test]
    fn missing_file_and_no_files_are_errors() {
        let e = load_csvs(&[PathBuf::from("/definitely/not/here.csv")], &schema()).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(matches!(load_csvs(&[], &schema()), Err(Error::Data { .. })));
    }

    #[test]
    fn error_in_second_file_names_that_file() {
        let d = tempfile::tempdir().unwrap();
        let p1 = csv_file(&d, "good.csv", "a,b,y\n1,2,0\n");
        let p2 = csv_file(&d, "bad.csv", "a,b,y\n1,2,0\n1,2,9\n");
        let (file, line, ..) = data_parts(&load_csvs(&[p1, p2], &schema()).unwrap_err());
        assert!(file.ends_with("bad.csv"), "{file}");
        assert_eq!(line, Some(3));
    }

    // --- write_csv ----------------------------------------------------------------

    #[test]
    fn write_csv_round_trips() {
        let ds = dataset(&[(&[1.5, -2.0], 2), (&[0.1, 3.4e38], 0)]);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.csv");
        write_csv(&p, &ds, &schema()).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("a,b,y\n1.5,-2,fault\n"), "{text}");
        assert_eq!(load_csvs(&[p], &schema()).unwrap(), ds);
    }

    #[test]
    fn write_csv_refuses_mismatched_data() {
        let d = tempfile::tempdir().unwrap();
        let three = dataset(&[(&[1.0, 2.0, 3.0], 0)]);
        assert!(write_csv(&d.path().join("x.csv"), &three, &schema()).is_err());
        let bad_label = dataset(&[(&[1.0, 2.0], 7)]);
        assert!(write_csv(&d.path().join("y.csv"), &bad_label, &schema()).is_err());
    }

    // --- FeatureStats ---------------------------------------------------------------

    #[test]
    fn merged_stats_equal_stats_of_concatenation() {
        let a = dataset(&[(&[1.0, 10.0], 0), (&[2.0, 20.0], 1)]);
        let b = dataset(&[(&[3.0, -5.0], 1), (&[4.5, 0.25], 0), (&[-1.0, 8.0], 2)]);
        let mut merged = FeatureStats::empty(2);
        merged.merge(&FeatureStats::of(&a)).unwrap();
        merged.merge(&FeatureStats::of(&b)).unwrap();
        let whole = FeatureStats::of(&Dataset::concat(&[a, b]).unwrap());
        assert_eq!(merged.count, 5);
        assert_eq!(merged.count, whole.count);
        for j in 0..2 {
            assert!((merged.sum[j] - whole.sum[j]).abs() < 1e-12);
            assert!((merged.sum_sq[j] - whole.sum_sq[j]).abs() < 1e-9);
        }
    }

    #[test]
    fn merge_refuses_a_length_mismatch() {
        let mut s = FeatureStats::empty(2);
        let e = s.merge(&FeatureStats::empty(3)).unwrap_err().to_string();
        assert!(e.contains("3 features but 2"), "{e}");
    }

    #[test]
    fn scaling_is_mean_and_population_std() {
        let ds = dataset(&[
            (&[2.0, 1.0], 0),
            (&[4.0, 1.0], 0),
            (&[4.0, 1.0], 0),
            (&[4.0, 1.0], 0),
            (&[5.0, 1.0], 0),
            (&[5.0, 1.0], 0),
            (&[7.0, 1.0], 0),
            (&[9.0, 1.0], 0),
        ]);
        let sc = FeatureStats::of(&ds).to_scaling(false).unwrap();
        assert!((sc.mean[0] - 5.0).abs() < 1e-12);
        assert!(
            (sc.std[0] - 2.0).abs() < 1e-12,
            "population std of the classic example is 2"
        );
        // A constant column gets std 1 instead of 0.
        assert_eq!(sc.mean[1], 1.0);
        assert_eq!(sc.std[1], 1.0);
    }

    #[test]
    fn constant_sensor_at_a_large_level_gets_unit_std() {
        // E[x²] − mean² does not cancel to exactly 0 here in f64.
        let rows: Vec<(&[f32], u32)> = vec![(&[2705.3f32][..], 0); 4321];
        let sc = FeatureStats::of(&dataset(&rows)).to_scaling(false).unwrap();
        assert_eq!(sc.std[0], 1.0);
        assert!((sc.mean[0] - f64::from(2705.3f32)).abs() < 1e-9);
    }

    #[test]
    fn small_but_real_spread_at_a_large_level_is_kept() {
        let rows: Vec<(&[f32], u32)> = (0..1000)
            .map(|i| {
                (
                    if i % 2 == 0 {
                        &[2700.0f32][..]
                    } else {
                        &[2700.5f32][..]
                    },
                    0,
                )
            })
            .collect();
        let sc = FeatureStats::of(&dataset(&rows)).to_scaling(false).unwrap();
        assert!((sc.std[0] - 0.25).abs() < 1e-9, "{}", sc.std[0]);
    }

    #[test]
    fn validate_refuses_bad_stats() {
        let good = FeatureStats {
            count: 2,
            sum: vec![1.0, 2.0],
            sum_sq: vec![1.0, 4.0],
        };
        good.validate(2).unwrap();
        assert!(good.validate(3).is_err());
        let mut s = good.clone();
        s.count = 0;
        assert!(s.validate(2).is_err());
        assert!(s.to_scaling(false).is_err());
        let mut s = good.clone();
        s.sum[1] = f64::NAN;
        assert!(s.validate(2).is_err());
        let mut s = good.clone();
        s.sum_sq[0] = -1.0;
        assert!(s.validate(2).is_err());
        let mut s = good;
        s.sum_sq[0] = f64::INFINITY;
        assert!(s.validate(2).is_err());
    }

    // --- Dataset helpers ------------------------------------------------------------

    #[test]
    fn standardise_gives_zero_mean_unit_std() {
        let mut ds = dataset(&[(&[1.0, 100.0], 0), (&[3.0, 100.0], 1), (&[5.0, 100.0], 1)]);
        let sc = FeatureStats::of(&ds).to_scaling(false).unwrap();
        ds.standardise(&sc).unwrap();
        let after = FeatureStats::of(&ds).to_scaling(false).unwrap();
        assert!(after.mean[0].abs() < 1e-6);
        assert!((after.std[0] - 1.0).abs() < 1e-6);
        // The constant column becomes all zeros.
        assert!(ds.features.iter().skip(1).step_by(2).all(|&v| v == 0.0));
    }

    #[test]
    fn standardise_refuses_bad_scaling_and_leaves_data_alone() {
        let mut ds = dataset(&[(&[1.0, 2.0], 0)]);
        let before = ds.clone();
        let short = Scaling {
            mean: vec![0.0],
            std: vec![1.0],
            ..Default::default()
        };
        assert!(ds.standardise(&short).is_err());
        let zero = Scaling {
            mean: vec![0.0, 0.0],
            std: vec![1.0, 0.0],
            ..Default::default()
        };
        assert!(ds.standardise(&zero).is_err());
        let overflow = Scaling {
            mean: vec![0.0, 0.0],
            std: vec![1.0, 1e-300],
            ..Default::default()
        };
        assert!(ds.standardise(&overflow).is_err());
        assert_eq!(ds, before);
    }

    fn labelled(counts: &[usize]) -> Dataset {
        let mut ds = Dataset {
            n_features: 1,
            ..Dataset::default()
        };
        for (c, &n) in counts.iter().enumerate() {
            for _ in 0..n {
                ds.features.push(ds.labels.len() as f32);
                ds.labels.push(c as u32);
            }
        }
        ds
    }

    #[test]
    fn split_is_deterministic_per_seed() {
        let ds = labelled(&[50, 30, 20]);
        let (t1, v1) = ds.split_validation(0.2, 7);
        let (t2, v2) = ds.split_validation(0.2, 7);
        assert_eq!((&t1, &v1), (&t2, &v2));
        let (_, v3) = ds.split_validation(0.2, 8);
        assert_ne!(v1, v3, "another seed picks other rows");
    }

    #[test]
    fn split_is_stratified_and_keeps_small_classes_in_both() {
        let ds = labelled(&[100, 10, 2, 1]);
        let (train, val) = ds.split_validation(0.2, 1);
        assert_eq!(val.class_counts(4), vec![20, 2, 1, 0]);
        assert_eq!(train.class_counts(4), vec![80, 8, 1, 1]);
        // Every row lands in exactly one part, unchanged.
        let mut all: Vec<f32> = train
            .features
            .iter()
            .chain(&val.features)
            .copied()
            .collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, (0..113).map(|i| i as f32).collect::<Vec<_>>());
        // Rows keep their original order within a part.
        assert!(val.features.windows(2).all(|w| w[0] < w[1]));
        // A tiny fraction still validates every class with two or more rows.
        let (_, val) = ds.split_validation(0.001, 1);
        assert_eq!(val.class_counts(4), vec![1, 1, 1, 0]);
    }

    #[test]
    fn split_edge_fractions() {
        let ds = labelled(&[5, 5]);
        let (t, v) = ds.split_validation(0.0, 1);
        assert_eq!((t.len(), v.len()), (10, 0));
        let (t, v) = ds.split_validation(f64::NAN, 1);
        assert_eq!((t.len(), v.len()), (10, 0));
        let (t, v) = ds.split_validation(1.0, 1);
        assert_eq!((t.len(), v.len()), (0, 10));
        assert_eq!(t.n_features, 1);
    }

    #[test]
    fn class_counts_ignore_out_of_range_labels() {
        let ds = labelled(&[2, 0, 3]);
        assert_eq!(ds.class_counts(3), vec![2, 0, 3]);
        assert_eq!(ds.class_counts(2), vec![2, 0]);
    }

    #[test]
    fn concat_joins_and_checks_widths() {
        let a = dataset(&[(&[1.0, 2.0], 0)]);
        let b = dataset(&[(&[3.0, 4.0], 1), (&[5.0, 6.0], 2)]);
        let ab = Dataset::concat(&[a.clone(), b]).unwrap();
        assert_eq!(ab.len(), 3);
        assert_eq!(ab.row(2), &[5.0, 6.0]);
        assert_eq!(ab.labels, vec![0, 1, 2]);
        let c = dataset(&[(&[1.0], 0)]);
        assert!(Dataset::concat(&[a, c]).is_err());
        assert!(Dataset::concat(&[]).unwrap().is_empty());
    }
}
