//! The coordinator's durable record (redb): trainings, the global model of the
//! last completed round, and every accepted contribution of the round in
//! progress. After a crash (`kill -9`, power loss) the coordinator reopens this
//! file and resumes each unfinished training where it was: committed rounds are
//! never redone or lost, and the round in progress keeps the updates already
//! accepted.
//!
//! Why redb: an embedded, pure-Rust ACID store (copy-on-write B-trees, fsync on
//! commit, automatic repair after an unclean shutdown) — no database server to run
//! at the anchor company and no C library to build. Records are encoded with
//! bincode (compact, serde-derived); model and delta values are raw little-endian f32.
//!
//! Commit points, in the order the round driver reaches them:
//! 1. a contribution is acknowledged to its participant only after
//!    [`Store::put_contribution`] committed it;
//! 2. a round is complete once [`Store::complete_round`] committed its model (and
//!    dropped its contributions) in one transaction;
//! 3. its evaluation is complete once [`Store::mark_evaluated`] committed.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use sangsaeng_common::weights;

use crate::error::{CoordinatorError, Result};
use crate::state::AcceptedUpdate;

/// training id → bincode [`TrainingRecord`].
const TRAININGS: TableDefinition<&str, &[u8]> = TableDefinition::new("trainings");
/// training id → little-endian f32 of the global model after `completed_round`.
const MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("models");
/// (training id, round, organisation) → bincode [`StoredContribution`].
const CONTRIBUTIONS: TableDefinition<(&str, u32, &str), &[u8]> =
    TableDefinition::new("contributions");

/// Layout version of the records; bumped when a record's fields change.
const RECORD_VERSION: u32 = 1;

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

/// An accepted update, kept until its round completes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredContribution {
    pub version: u32,
    pub org_id: String,
    pub sha256: String,
    pub num_examples: u64,
    pub train_loss: f64,
    /// Little-endian f32 delta.
    pub delta: Vec<u8>,
}

impl StoredContribution {
    pub fn new(update: &AcceptedUpdate, delta: &[f32]) -> Self {
        StoredContribution {
            version: RECORD_VERSION,
            org_id: update.org_id.clone(),
            sha256: update.sha256.clone(),
            num_examples: update.num_examples,
            train_loss: update.train_loss,
            delta: weights::to_le_bytes(delta),
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

    /// The delta, checked against its recorded digest (a damaged record is refused).
    pub fn delta(&self) -> Result<Vec<f32>> {
        let values = weights::from_le_bytes(&self.delta)?;
        if weights::digest(&values) != self.sha256 {
            return Err(corrupt(format!(
                "the stored update of '{}' does not match its digest",
                self.org_id
            )));
        }
        Ok(values)
    }
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

    /// The global model of the last completed round.
    pub fn model(&self, id: &str) -> Result<Option<Vec<f32>>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(MODELS).map_err(db_err)?;
        match t.get(id).map_err(db_err)? {
            Some(v) => Ok(Some(weights::from_le_bytes(v.value())?)),
            None => Ok(None),
        }
    }

    /// Durably records an accepted update of `round` (commit point 1).
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
    pub fn complete_round(&self, rec: &TrainingRecord, model: &[f32]) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            tx.open_table(MODELS)
                .map_err(db_err)?
                .insert(rec.id.as_str(), weights::to_le_bytes(model).as_slice())
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

    fn contribution(org: &str, delta: &[f32]) -> StoredContribution {
        StoredContribution::new(
            &AcceptedUpdate {
                org_id: org.into(),
                sha256: weights::digest(delta),
                num_examples: 10,
                train_loss: 0.5,
            },
            delta,
        )
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let s = Store::open(&path).unwrap();
            let mut rec = Store::new_record("t-1", "plan".into(), dir.path());
            s.put_training(&rec).unwrap();
            s.put_contribution("t-1", 1, &contribution("b", &[1.0, 2.0]))
                .unwrap();
            s.put_contribution("t-1", 1, &contribution("a", &[3.0, 4.0]))
                .unwrap();
            s.put_contribution("t-1", 2, &contribution("a", &[5.0, 6.0]))
                .unwrap();
            assert_eq!(s.contributions("t-1", 1).unwrap().len(), 2);
            rec.completed_round = 1;
            s.complete_round(&rec, &[0.5, 0.25]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let rec = s.training("t-1").unwrap().unwrap();
        assert_eq!(rec.completed_round, 1);
        assert_eq!(s.unfinished().unwrap(), vec![rec]);
        assert_eq!(s.model("t-1").unwrap().unwrap(), vec![0.5, 0.25]);
        // Round 1's contributions went with its commit; round 2's stay.
        assert!(s.contributions("t-1", 1).unwrap().is_empty());
        let c = s.contributions("t-1", 2).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].delta().unwrap(), vec![5.0, 6.0]);
        s.clear_contributions("t-1", 2).unwrap();
        assert!(s.contributions("t-1", 2).unwrap().is_empty());
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let e = decode::<TrainingRecord>(&[0xff, 0x01], "training record").unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        let mut c = contribution("a", &[1.0]);
        c.delta = weights::to_le_bytes(&[2.0]);
        assert!(c.delta().unwrap_err().to_string().contains("digest"));
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
        let c = StoredContribution::new(&update, &vec![0.5; 300_000]);
        let back: StoredContribution = decode(&encode(&c), "contribution").unwrap();
        assert_eq!(back, c);
    }
}
