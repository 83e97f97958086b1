//! The coordinator's durable record (redb): trainings, where the global model of
//! the last completed round is, and every accepted contribution of the round in
//! progress. After a crash (`kill -9`, power loss) the coordinator reopens this
//! file and resumes each unfinished training where it was: committed rounds are
//! never redone or lost, and the round in progress keeps the updates already
//! accepted.
//!
//! Why redb: an embedded, pure-Rust ACID store (copy-on-write B-trees, fsync on
//! commit, automatic repair after an unclean shutdown) — no database server to run
//! at the anchor company and no C library to build. Records are encoded with
//! bincode (compact, serde-derived). The bulk data stays in files the records
//! point to, each fsynced before its record is committed and checked against the
//! record's digest when read back: a round's model in its safetensors file, an
//! accepted update in its spill file (the chunks as they arrived). A 1e9-parameter
//! model is 4 GB, which has no place in one B-tree value.
//!
//! Commit points, in the order the round driver reaches them:
//! 1. a contribution is acknowledged to its participant only after its spill was
//!    fsynced and [`Store::put_contribution`] committed it (unless the operator
//!    chose `durable_updates = false`);
//! 2. a round is complete once its model file is fsynced and
//!    [`Store::complete_round`] committed its digest (and dropped its
//!    contributions) in one transaction;
//! 3. its evaluation is complete once [`Store::put_training`] committed the
//!    record with its `evaluated_round`.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use sangsaeng_common::aggregation::fedavg::Accumulator;
use sangsaeng_common::config::plan::TrainingPlan;
use sangsaeng_common::learning::model::ModelSpec;
use sangsaeng_common::transfer::digest::{self, DigestAlgorithm};
use sangsaeng_common::transfer::encoding::UpdateEncoding;
use sangsaeng_common::transfer::weights;

use crate::error::{CoordinatorError, Result};
use std::collections::BTreeMap;

use crate::transfer::read_spill;

/// An update that passed every check and was folded into the round's accumulator.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AcceptedUpdate {
    pub org_id: String,
    pub sha256: String,
    pub num_examples: u64,
    pub train_loss: f64,
}

/// training id → bincode [`TrainingRecord`].
const TRAININGS: TableDefinition<&str, &[u8]> = TableDefinition::new("trainings");
/// training id → bincode [`StoredModel`]: where the global model after `completed_round` is.
const MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("models");
/// (training id, organisation) → the training rows the site declared in the
/// statistics phase: what its updates' weights are checked against, also after
/// a restart. A separate table rather than a field of [`TrainingRecord`], so
/// that stores written before it still decode (their trainings resume unbound).
const DECLARED_ROWS: TableDefinition<(&str, &str), u64> = TableDefinition::new("declared_rows");
/// (training id, organisation) → the example count a site that joined after
/// the statistics phase claimed with its first update: its later updates must
/// claim the same. Kept apart from [`DECLARED_ROWS`] so that
/// `max_weight_share`'s cap, computed from the statistics phase's rows only,
/// is the same after a restart.
const CLAIMED_ROWS: TableDefinition<(&str, &str), u64> = TableDefinition::new("claimed_rows");
/// (training id, round, organisation) → bincode [`StoredContribution`].
const CONTRIBUTIONS: TableDefinition<(&str, u32, &str), &[u8]> =
    TableDefinition::new("contributions");

/// Layout version of the records; bumped when a record's fields change.
/// Version 2: updates and models moved out of the store into files (a 1e9-parameter
/// model is 4 GB, beyond what belongs in one B-tree value).
pub const RECORD_VERSION: u32 = 2;

/// What the store knows about one training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    pub version: u32,
    pub id: String,
    /// The plan as TOML; includes the federated scaling once it is known.
    pub plan_toml: String,
    pub output_dir: String,
    /// Last round whose global model is committed (0 = only the initial model).
    pub completed_round: u32,
    /// Last round whose evaluation and metrics line are written.
    pub evaluated_round: u32,
    pub finished: bool,
    pub error: Option<String>,
    /// Updates that made the last completed round (for its metrics line, if the
    /// coordinator stopped before writing it).
    pub last_updates: Vec<AcceptedUpdate>,
}

/// An accepted update, kept until its round completes. Its chunks, exactly as
/// they arrived, are in a spill file (`transfer::Spill`) fsynced before this
/// record was committed; the record holds what is needed to fold it in again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredContribution {
    pub version: u32,
    pub org_id: String,
    /// Digest id (`sangsaeng_common::transfer::digest`: SHA-256 hex, or `blake3:` and hex)
    /// of the update's bytes as sent (all chunks, in order).
    pub sha256: String,
    pub num_examples: u64,
    pub train_loss: f64,
    /// The update encoding's name (`float32`, `float16`, `int8`).
    pub encoding: String,
    /// The spill file holding the update's chunks.
    pub spill: String,
}

impl StoredContribution {
    pub fn new(update: &AcceptedUpdate, encoding: UpdateEncoding, spill: &Path) -> Self {
        StoredContribution {
            version: RECORD_VERSION,
            org_id: update.org_id.clone(),
            sha256: update.sha256.clone(),
            num_examples: update.num_examples,
            train_loss: update.train_loss,
            encoding: encoding.name().to_string(),
            spill: spill.display().to_string(),
        }
    }

    pub fn accepted(&self) -> AcceptedUpdate {
        AcceptedUpdate {
            org_id: self.org_id.clone(),
            sha256: self.sha256.clone(),
            num_examples: self.num_examples,
            train_loss: self.train_loss,
        }
    }

    /// Folds the stored update into `acc`, checking its spill file against the
    /// recorded digest as it reads it once; a damaged or missing file is refused
    /// and what was folded of it is subtracted again, leaving `acc` as it was.
    /// Where a robust rule reads this update back, at its weight in the fold.
    pub fn spilled_update(&self, weight: u64) -> Result<crate::transfer::spill::SpilledUpdate> {
        Ok(crate::transfer::spill::SpilledUpdate {
            org_id: self.org_id.clone(),
            path: PathBuf::from(&self.spill),
            encoding: UpdateEncoding::from_name(&self.encoding)
                .map_err(|e| corrupt(format!("the stored update of '{}': {e}", self.org_id)))?,
            weight,
        })
    }

    pub fn fold_into(&self, acc: &mut Accumulator, weight: u64) -> Result<()> {
        let encoding = UpdateEncoding::from_name(&self.encoding)
            .map_err(|e| corrupt(format!("the stored update of '{}': {e}", self.org_id)))?;
        let path = Path::new(&self.spill);
        let mismatch = || {
            corrupt(format!(
                "the stored update of '{}' does not match its digest",
                self.org_id
            ))
        };
        acc.reserve(weight)?;
        let mut h = digest::Hasher::new(DigestAlgorithm::of_id(&self.sha256));
        let (mut values_read, mut folded) = (0usize, 0u32);
        let read = read_spill(path, encoding, None, |offset, values, raw| {
            h.update(raw);
            acc.fold(offset, values, weight)?;
            folded += 1;
            values_read += values.len();
            Ok(())
        });
        let checked = read.and_then(|()| {
            if h.finalize_id() == self.sha256 && values_read == acc.num_params() {
                Ok(())
            } else {
                Err(mismatch())
            }
        });
        if let Err(e) = checked {
            // Only on this (rare) path is the file read a second time.
            let _ = read_spill(path, encoding, Some(folded), |o, v, _| {
                acc.unfold(o, v, weight);
                Ok(())
            });
            acc.release(weight);
            return Err(e);
        }
        acc.commit();
        Ok(())
    }
}

/// Where the global model of a training's last completed round is: the round's
/// safetensors file (written and fsynced before this record), and its digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredModel {
    pub version: u32,
    pub round: u32,
    pub sha256: String,
    pub file: String,
}

fn corrupt(m: String) -> CoordinatorError {
    CoordinatorError::Store(format!("state store is damaged: {m}"))
}

fn db_err(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Store(e.to_string())
}

/// Encodes a record for the store (public for the fuzz targets' round trips).
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard())
        .expect("encoding a plain record cannot fail")
}

/// Decodes a stored record; damaged or foreign bytes are an error, never a panic.
///
/// bincode allocates a string or vector as soon as it reads its length prefix,
/// so a damaged prefix could ask for gigabytes (fuzzing found exactly that: a
/// 9-byte record requesting 4 GB). bincode's limit counts decoded sizes: a
/// string counts its bytes, but a one-byte varint counts as its full 8-byte
/// integer, so a legitimate record never counts more than 8 times its encoded
/// size. The limit is therefore 8 times the record's size rounded up to a power
/// of two (bincode's limit is a compile-time constant): every valid record
/// decodes, and a damaged one allocates at most 16 times its own size.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T> {
    fn limited<T: for<'de> Deserialize<'de>, const LIMIT: usize>(
        bytes: &[u8],
    ) -> std::result::Result<(T, usize), bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(bytes, bincode::config::standard().with_limit::<LIMIT>())
    }
    let decoded = match bytes.len() {
        n if n <= 1 << 12 => limited::<T, { 1 << 16 }>(bytes),
        n if n <= 1 << 16 => limited::<T, { 1 << 20 }>(bytes),
        n if n <= 1 << 20 => limited::<T, { 1 << 24 }>(bytes),
        n if n <= 1 << 24 => limited::<T, { 1 << 28 }>(bytes),
        n if n <= 1 << 28 => limited::<T, { 1 << 32 }>(bytes),
        n if n <= 1 << 32 => limited::<T, { 1 << 36 }>(bytes),
        _ => limited::<T, { 1 << 44 }>(bytes),
    };
    let (v, used) = decoded.map_err(|e| corrupt(format!("{what}: {e}")))?;
    if used != bytes.len() {
        return Err(corrupt(format!(
            "{what}: {} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(v)
}

pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store; redb repairs it if the last run did not shut down cleanly.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| CoordinatorError::io(format!("creating {}", dir.display()), e))?;
        }
        let db = Database::create(path)
            .map_err(|e| CoordinatorError::Store(format!("opening {}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(TRAININGS).map_err(db_err)?;
        tx.open_table(MODELS).map_err(db_err)?;
        tx.open_table(CONTRIBUTIONS).map_err(db_err)?;
        tx.open_table(DECLARED_ROWS).map_err(db_err)?;
        tx.open_table(CLAIMED_ROWS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    pub fn new_record(id: &str, plan_toml: String, output_dir: &Path) -> TrainingRecord {
        TrainingRecord {
            version: RECORD_VERSION,
            id: id.to_string(),
            plan_toml,
            output_dir: output_dir.display().to_string(),
            completed_round: 0,
            evaluated_round: 0,
            finished: false,
            error: None,
            last_updates: vec![],
        }
    }

    pub fn put_training(&self, rec: &TrainingRecord) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(TRAININGS)
            .map_err(db_err)?
            .insert(rec.id.as_str(), encode(rec).as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub fn training(&self, id: &str) -> Result<Option<TrainingRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(TRAININGS).map_err(db_err)?;
        match t.get(id).map_err(db_err)? {
            Some(v) => Ok(Some(decode(v.value(), "training record")?)),
            None => Ok(None),
        }
    }

    /// Trainings that neither completed nor failed: the ones to resume.
    pub fn unfinished(&self) -> Result<Vec<TrainingRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(TRAININGS).map_err(db_err)?;
        let mut out = vec![];
        for entry in t.iter().map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            let rec: TrainingRecord = decode(v.value(), "training record")?;
            if !rec.finished {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// The global model of the last completed round, read back from its file and
    /// checked against the committed digest.
    pub fn model(&self, id: &str) -> Result<Option<Vec<f32>>> {
        let (Some(rec), Some(m)) = (self.training(id)?, self.model_record(id)?) else {
            return Ok(None);
        };
        let plan = TrainingPlan::from_toml(&rec.plan_toml, &format!("stored plan of {id}"))?;
        let layout = ModelSpec::from_plan(&plan).layout();
        let params = weights::load_safetensors(Path::new(&m.file), &layout)
            .map_err(|e| corrupt(format!("the model of round {}: {e}", m.round)))?;
        if weights::digest(&params) != m.sha256 {
            return Err(corrupt(format!(
                "{} does not match the digest committed for round {}",
                m.file, m.round
            )));
        }
        Ok(Some(params))
    }

    pub fn model_record(&self, id: &str) -> Result<Option<StoredModel>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(MODELS).map_err(db_err)?;
        match t.get(id).map_err(db_err)? {
            Some(v) => Ok(Some(decode(v.value(), "model record")?)),
            None => Ok(None),
        }
    }

    /// Durably records an accepted update of `round` (commit point 1).
    /// Records each site's declared training rows, all in one transaction.
    pub fn put_declared_rows(&self, id: &str, rows: &BTreeMap<String, u64>) -> Result<()> {
        self.put_rows(DECLARED_ROWS, id, rows)
    }

    /// The rows each site declared for training `id` (empty if none were recorded).
    pub fn declared_rows(&self, id: &str) -> Result<BTreeMap<String, u64>> {
        self.rows(DECLARED_ROWS, id)
    }

    /// Records the first claim of a site that joined after the statistics phase.
    pub fn put_claimed_rows(&self, id: &str, org: &str, n: u64) -> Result<()> {
        self.put_rows(CLAIMED_ROWS, id, &[(org.to_string(), n)].into())
    }

    /// The first claims of late joiners of training `id`.
    pub fn claimed_rows(&self, id: &str) -> Result<BTreeMap<String, u64>> {
        self.rows(CLAIMED_ROWS, id)
    }

    fn put_rows(
        &self,
        table: TableDefinition<(&str, &str), u64>,
        id: &str,
        rows: &BTreeMap<String, u64>,
    ) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(table).map_err(db_err)?;
            for (org, n) in rows {
                t.insert((id, org.as_str()), *n).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    fn rows(
        &self,
        table: TableDefinition<(&str, &str), u64>,
        id: &str,
    ) -> Result<BTreeMap<String, u64>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(table).map_err(db_err)?;
        let mut out = BTreeMap::new();
        for entry in t.range((id, "")..).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (kid, org) = k.value();
            if kid != id {
                break;
            }
            out.insert(org.to_string(), v.value());
        }
        Ok(out)
    }

    pub fn put_contribution(&self, id: &str, round: u32, c: &StoredContribution) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(CONTRIBUTIONS)
            .map_err(db_err)?
            .insert((id, round, c.org_id.as_str()), encode(c).as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    pub fn contributions(&self, id: &str, round: u32) -> Result<Vec<StoredContribution>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(CONTRIBUTIONS).map_err(db_err)?;
        let mut out = vec![];
        for entry in t.range((id, round, "")..).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (kid, kround, _) = k.value();
            if kid != id || kround != round {
                break;
            }
            out.push(decode(v.value(), "contribution")?);
        }
        Ok(out)
    }

    /// Drops the contributions of a round that is being re-run (too few updates).
    pub fn clear_contributions(&self, id: &str, round: u32) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(CONTRIBUTIONS).map_err(db_err)?;
            t.retain(|(kid, kround, _), _| !(kid == id && kround == round))
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Commits a round: its global model, the round counter, and drops its
    /// contributions, all in one transaction (commit point 2).
    pub fn complete_round(&self, rec: &TrainingRecord, model: &StoredModel) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            tx.open_table(MODELS)
                .map_err(db_err)?
                .insert(rec.id.as_str(), encode(model).as_slice())
                .map_err(db_err)?;
            tx.open_table(TRAININGS)
                .map_err(db_err)?
                .insert(rec.id.as_str(), encode(rec).as_slice())
                .map_err(db_err)?;
            let mut c = tx.open_table(CONTRIBUTIONS).map_err(db_err)?;
            let (id, round) = (rec.id.as_str(), rec.completed_round);
            c.retain(|(kid, kround, _), _| !(kid == id && kround <= round))
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A contribution whose spill file (in `dir`) holds `delta` as two float32 chunks.
    fn contribution(dir: &Path, org: &str, delta: &[f32]) -> StoredContribution {
        let path = dir.join(format!("{org}-{}.bin", delta.len()));
        let mut spill = crate::transfer::Spill::create(&path, true).unwrap();
        let bytes = weights::to_le_bytes(delta);
        let (a, b) = bytes.split_at(bytes.len() / 8 * 4);
        spill.append(a).unwrap();
        spill.append(b).unwrap();
        spill.sync().unwrap();
        StoredContribution::new(
            &AcceptedUpdate {
                org_id: org.into(),
                sha256: weights::sha256_hex(&bytes),
                num_examples: 10,
                train_loss: 0.5,
            },
            UpdateEncoding::Float32,
            &path,
        )
    }

    fn stored_model(dir: &Path, round: u32, params: &[f32]) -> StoredModel {
        let plan = TrainingPlan::from_toml(PLAN, "test").unwrap();
        let layout = ModelSpec::from_plan(&plan).layout();
        let file = dir.join(format!("model-round-{round}.safetensors"));
        weights::save_safetensors(&file, &layout, params, Default::default()).unwrap();
        StoredModel {
            version: RECORD_VERSION,
            round,
            sha256: weights::digest(params),
            file: file.display().to_string(),
        }
    }

    const PLAN: &str = "[schema]\nfeature_columns = [\"x\"]\nlabel_column = \"y\"\nclasses = [\"a\", \"b\"]\n[model]\nhidden_layers = []\n[training]\nrounds = 1\nlearning_rate = 0.1\nmin_participants = 1\n";

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let s = Store::open(&path).unwrap();
            let mut rec = Store::new_record("t-1", PLAN.into(), dir.path());
            s.put_training(&rec).unwrap();
            let d = dir.path();
            s.put_contribution("t-1", 1, &contribution(d, "b", &[1.0, 2.0]))
                .unwrap();
            s.put_contribution("t-1", 1, &contribution(d, "a", &[3.0, 4.0]))
                .unwrap();
            s.put_contribution("t-1", 2, &contribution(d, "a", &[5.0, 6.0, 7.0, 8.0]))
                .unwrap();
            assert_eq!(s.contributions("t-1", 1).unwrap().len(), 2);
            rec.completed_round = 1;
            let m = stored_model(d, 1, &[0.5, 0.25, 1.0, 2.0]);
            s.complete_round(&rec, &m).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let rec = s.training("t-1").unwrap().unwrap();
        assert_eq!(rec.completed_round, 1);
        assert_eq!(s.unfinished().unwrap(), vec![rec]);
        assert_eq!(s.model("t-1").unwrap().unwrap(), vec![0.5, 0.25, 1.0, 2.0]);
        // Round 1's contributions went with its commit; round 2's stay.
        assert!(s.contributions("t-1", 1).unwrap().is_empty());
        let c = s.contributions("t-1", 2).unwrap();
        assert_eq!(c.len(), 1);
        let mut acc = Accumulator::new(4);
        c[0].fold_into(&mut acc, 10).unwrap();
        assert_eq!(acc.apply_to(&[0.0; 4]).unwrap(), vec![5.0, 6.0, 7.0, 8.0]);
        // A spill file that no longer matches its digest is refused, acc untouched
        // (its first chunk, 1.5, is folded before the digest can be checked, then
        // subtracted again).
        let before = acc.clone();
        let mut damaged = 4u32.to_le_bytes().to_vec();
        damaged.extend(1.5f32.to_le_bytes());
        std::fs::write(&c[0].spill, damaged).unwrap();
        let e = c[0].fold_into(&mut acc, 10).unwrap_err().to_string();
        assert!(e.contains("digest"), "{e}");
        assert_eq!(acc, before);
        s.clear_contributions("t-1", 2).unwrap();
        assert!(s.contributions("t-1", 2).unwrap().is_empty());
    }

    #[test]
    fn declared_rows_survive_reopening_per_training() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let rows: BTreeMap<String, u64> = [("site-a".into(), 300), ("site-b".into(), 500)].into();
        {
            let s = Store::open(&path).unwrap();
            s.put_declared_rows("t-1", &rows).unwrap();
            s.put_declared_rows("t-2", &[("site-a".into(), 7)].into())
                .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.declared_rows("t-1").unwrap(), rows);
        assert_eq!(s.declared_rows("t-2").unwrap()["site-a"], 7);
        assert!(s.declared_rows("t-0").unwrap().is_empty());
        s.put_claimed_rows("t-1", "site-c", 40).unwrap();
        assert_eq!(s.claimed_rows("t-1").unwrap()["site-c"], 40);
        assert_eq!(
            s.declared_rows("t-1").unwrap(),
            rows,
            "claims are kept apart"
        );
    }

    #[test]
    fn a_stored_update_is_checked_with_the_algorithm_its_digest_names() {
        let dir = tempfile::tempdir().unwrap();
        let delta = [0.5f32, -1.0, 2.0, 0.25];
        let bytes = weights::to_le_bytes(&delta);
        let mut c = contribution(dir.path(), "a", &delta);
        let blake3 = digest::digest(DigestAlgorithm::Blake3, &bytes);
        c.sha256 = DigestAlgorithm::Blake3.id(&blake3);
        let mut acc = Accumulator::new(4);
        c.fold_into(&mut acc, 10).unwrap();
        assert_eq!(acc.apply_to(&[0.0; 4]).unwrap(), delta.to_vec());
        // The update's SHA-256 labelled as BLAKE3 is not its BLAKE3: refused,
        // the accumulator left as it was.
        let before = acc.clone();
        c.sha256 = DigestAlgorithm::Blake3.id_of_hex(&weights::sha256_hex(&bytes));
        let e = c.fold_into(&mut acc, 10).unwrap_err().to_string();
        assert!(e.contains("does not match its digest"), "{e}");
        assert_eq!(acc, before);
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let e = decode::<TrainingRecord>(&[0xff, 0x01], "training record").unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let c = contribution(dir.path(), "a", &[1.0]);
        let mut bytes = encode(&c);
        bytes.push(0);
        assert!(decode::<StoredContribution>(&bytes, "contribution").is_err());
    }

    #[test]
    fn a_damaged_length_prefix_is_refused_without_allocating_it() {
        // Found by the store_records fuzz target: a string length of ~4 GB.
        let e = decode::<StoredContribution>(&[0x00, 0xfc, 0x08, 0x76, 0xf6, 0x00], "contribution")
            .unwrap_err()
            .to_string();
        assert!(e.contains("damaged"), "{e}");
        let e = decode::<TrainingRecord>(
            &[0x01, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            "training",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("damaged"), "{e}");
        // A record of many small integers (one-byte varints) still decodes.
        let mut rec = Store::new_record("t", String::new(), Path::new("o"));
        rec.last_updates = (0..500)
            .map(|i| AcceptedUpdate {
                org_id: String::new(),
                sha256: String::new(),
                num_examples: i % 100,
                train_loss: 0.0,
            })
            .collect();
        let back: TrainingRecord = decode(&encode(&rec), "training").unwrap();
        assert_eq!(back, rec);
        // A large legitimate record still decodes.
        let update = AcceptedUpdate {
            org_id: "a".into(),
            sha256: String::new(),
            num_examples: 1,
            train_loss: 0.0,
        };
        let c =
            StoredContribution::new(&update, UpdateEncoding::Int8, Path::new(&"x".repeat(4000)));
        let back: StoredContribution = decode(&encode(&c), "contribution").unwrap();
        assert_eq!(back, c);
    }
}
