//! Collecting one participant's update for the open round: the header's checks,
//! then each chunk checked, spilled and folded into the round's accumulator as it
//! arrives, then the trailer's digest, durability, and acceptance.
//!
//! Nothing here holds a whole delta: the coordinator's memory per upload is one
//! chunk buffer. An upload that breaks off is kept (folded so far) so its sender
//! can resume; one that is refused, or still unfinished when the round closes, is
//! undone exactly from its spill file, so the accumulator ends up holding accepted
//! updates only whatever happened in between.

use std::sync::Arc;

use tonic::Streaming;

use sangsaeng_common::transfer::encoding::UpdateEncoding;
use sangsaeng_proto::v1 as pb;

use crate::durable::store::{AcceptedUpdate, StoredContribution};
use crate::error::{CoordinatorError, Result};
use crate::state::{Folding, PartialUpload, Phase, Shared, Training, current_training};
use crate::transfer::spill::spill_path;
use crate::transfer::{
    CheckedChunk, DeltaReceiver, Payload, Spill, delta_algorithm, read_spill, read_spill_raw,
    settle_header, settle_trailer,
};

/// Receives one upload stream from `org` to its end and returns the receipt, or
/// the refusal. Called by the `UploadUpdate` RPC in a task of its own.
pub async fn receive_update(
    shared: &Arc<Shared>,
    org: &str,
    mut stream: Streaming<pb::UpdateMessage>,
) -> Result<pb::UploadReceipt> {
    let idle = shared.config.limits.transfer_idle();
    let header = read_header(&mut stream, idle).await?;
    check_privacy_report(shared, &header)?;
    let (num_params, mark_id) = admit(shared, org, &header)?;
    let round = header.round;
    let _mark = UploadMark {
        shared,
        org: org.to_string(),
        id: mark_id,
    };
    // Bounded: each upload in flight has a spill file and chunk buffers. Taken
    // only after the header passed its checks, so a caller holds at most one slot
    // (its upload is marked) and streams that never send a header hold none. A
    // participant that reserved its slot beforehand (UploadProgress) uses that one.
    let permit = match shared.take_reserved_upload(org) {
        Some(permit) => permit,
        None => shared.upload_slot().await?,
    };
    let incoming = Incoming {
        shared,
        org,
        header: &header,
    };
    let mut unfinished: Option<u64> = None;
    let outcome = incoming
        .receive(num_params, &mut stream, permit, &mut unfinished)
        .await;
    if let (Some(id), Err(_)) = (unfinished, &outcome) {
        incoming.abandon(id);
    }
    let (sha256, accepted_in_round) = refuse_for_the_round(shared, org, round, outcome)?;
    tracing::info!(
        org,
        round,
        examples = header.num_examples,
        sha256 = &sha256[..12],
        "update accepted"
    );
    shared.notify();
    Ok(pb::UploadReceipt {
        sha256,
        accepted_in_round,
    })
}

/// The upload's first message, which must be its header.
async fn read_header(
    stream: &mut Streaming<pb::UpdateMessage>,
    idle: std::time::Duration,
) -> Result<pb::UpdateHeader> {
    match next_part(stream, idle).await? {
        pb::update_message::Part::Header(mut h) => {
            settle_header(&mut h)?;
            Ok(h)
        }
        _ => Err(CoordinatorError::InvalidArgument(
            "an upload must start with its header".into(),
        )),
    }
}

/// A record-level DP plan's update must report what its site spent, as the
/// coordinator's own accounting gives it. Outside the lock: deriving a site's
/// noise multiplier takes milliseconds.
fn check_privacy_report(shared: &Shared, header: &pb::UpdateHeader) -> Result<()> {
    let plan = shared.training().as_ref().map(|t| t.plan.clone());
    match plan {
        Some(plan) => super::privacy::check_reported_spend(&plan, header),
        None => Ok(()),
    }
}

/// The header's checks against the open round (base model, size, encoding,
/// example count); marks the upload as in progress. Returns the model's
/// parameter count and the mark's id.
fn admit(shared: &Shared, org: &str, header: &pb::UpdateHeader) -> Result<(usize, u64)> {
    let limits = &shared.config.limits;
    let mut guard = shared.training();
    let t = current_training(&mut guard, &header.training_id)?;
    may_upload(t, org, header.round)?;
    let base = t
        .models
        .get(&(t.round - 1))
        .expect("the round's base model is published");
    if header.base_model_sha256 != base.sha256 {
        return Err(CoordinatorError::FailedPrecondition(format!(
            "the update starts from model {}, but round {} started from {}",
            header.base_model_sha256, t.round, base.sha256
        )));
    }
    let n = t.update_len(base.params.len());
    if header.num_params != n as u64 {
        return Err(CoordinatorError::InvalidArgument(match t.plan.scaffold() {
            false => format!(
                "the update declares {} values, the model has {n}",
                header.num_params
            ),
            true => format!(
                "the update declares {} values, the round expects {n}: the model's {} twice (the delta, then the SCAFFOLD control-variate change)",
                header.num_params,
                base.params.len()
            ),
        }));
    }
    let encoding = UpdateEncoding::from_name(&header.encoding)
        .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
    if encoding != t.plan.training.update_encoding {
        return Err(CoordinatorError::InvalidArgument(format!(
            "the update is encoded as {}, the plan asks for {}",
            encoding.name(),
            t.plan.training.update_encoding.name()
        )));
    }
    check_secure_input(t, org, header)?;
    if header.num_examples == 0 || header.num_examples > limits.max_examples_per_update {
        return Err(CoordinatorError::InvalidArgument(format!(
            "num_examples {} is outside 1..={}",
            header.num_examples, limits.max_examples_per_update
        )));
    }
    check_declared_rows(&shared.store, t, org, header.num_examples)?;
    t.next_upload_id += 1;
    t.uploading.insert(org.to_string(), t.next_upload_id);
    Ok((n, t.next_upload_id))
}

/// FedAvg weighs an update by its example count, so a count is a claim on the
/// model: it must be the training rows the site's statistics counted (each
/// daemon trains on exactly those rows). A site claiming more would take the
/// weight of firms it is not. A site that joined after the statistics phase
/// declared nothing: its first update's count is recorded (trust on first
/// use, bounded by `limits.max_examples_per_update`) and its later ones must
/// repeat it.
fn check_declared_rows(
    store: &crate::durable::store::Store,
    t: &mut Training,
    org: &str,
    num_examples: u64,
) -> Result<()> {
    let (rows, source) = match (t.declared_rows.get(org), t.claimed_rows.get(org)) {
        (Some(&r), _) => (
            r,
            "training rows this site declared in the statistics phase",
        ),
        (None, Some(&r)) => (
            r,
            "examples this site claimed with its first update (it joined after the statistics phase)",
        ),
        // A training resumed from a store that predates declared rows (warned at resume).
        (None, None) if t.declared_rows.is_empty() => return Ok(()),
        (None, None) => {
            store.put_claimed_rows(&t.id, org, num_examples)?;
            t.claimed_rows.insert(org.to_string(), num_examples);
            tracing::warn!(
                org,
                num_examples,
                "a site that joined after the statistics phase claims this many examples; its later updates must claim the same"
            );
            return Ok(());
        }
    };
    if rows == num_examples {
        return Ok(());
    }
    Err(CoordinatorError::InvalidArgument(format!(
        "num_examples {num_examples} differs from the {rows} {source}: an update weighs what \
         the site declared (if its data changed since, it takes part in the next training)"
    )))
}

/// A secure round takes masked updates only, each under the attempt and index
/// its sender was given; a plain round takes none.
fn check_secure_input(t: &Training, org: &str, header: &pb::UpdateHeader) -> Result<()> {
    match (t.plan.secure_aggregation(), &t.secure, &header.secure) {
        (false, _, None) => Ok(()),
        (false, _, Some(_)) => Err(CoordinatorError::InvalidArgument(
            "the update is masked (UpdateHeader.secure), but this training does not use secure aggregation".into(),
        )),
        (true, _, None) => Err(CoordinatorError::InvalidArgument(
            "this training uses secure aggregation: the update must be masked (UpdateHeader.secure); an unmasked update is never accepted".into(),
        )),
        (true, None, Some(_)) => Err(CoordinatorError::FailedPrecondition(
            "no secure-aggregation attempt is taking updates".into(),
        )),
        (true, Some(attempt), Some(input)) => attempt.check_upload(org, input),
    }
}

/// A connection that broke or a round that closed may be retried; an update
/// that is malformed is refused for this round so the round does not wait for it.
fn refuse_for_the_round<T>(
    shared: &Shared,
    org: &str,
    round: u32,
    outcome: Result<T>,
) -> Result<T> {
    match outcome {
        Ok(v) => Ok(v),
        Err(e @ (CoordinatorError::Aborted(_) | CoordinatorError::FailedPrecondition(_))) => Err(e),
        Err(e) => {
            if let Some(t) = shared.training().as_mut().filter(|t| t.round == round) {
                t.rejected.insert(org.to_string(), e.to_string());
            }
            shared.notify();
            Err(e)
        }
    }
}

/// One upload being received: who sends it and its header.
struct Incoming<'a> {
    shared: &'a Arc<Shared>,
    org: &'a str,
    header: &'a pb::UpdateHeader,
}

impl Incoming<'_> {
    /// Receives the chunks and the trailer, makes the update durable and counts
    /// it. `unfinished` holds the upload's id while it is folded in but not
    /// accepted (or kept for resumption): the caller undoes it on an error.
    async fn receive(
        &self,
        num_params: usize,
        stream: &mut Streaming<pb::UpdateMessage>,
        permit: tokio::sync::OwnedSemaphorePermit,
        unfinished: &mut Option<u64>,
    ) -> Result<(String, u32)> {
        let (rx, spill, upload_id) = self.resume_or_new(num_params)?;
        *unfinished = Some(upload_id);
        let encoding = rx.encoding();
        let rx_masked = rx.is_masked();
        let (rx, spill, trailer) = self
            .receive_chunks(stream, rx, spill, upload_id, unfinished)
            .await?;
        let header = self.header;
        if !header.delta_sha256.is_empty() && trailer.sha256 != header.delta_sha256 {
            return Err(CoordinatorError::InvalidArgument(format!(
                "the trailer's digest {} differs from the digest {} declared in the header",
                trailer.sha256, header.delta_sha256
            )));
        }
        let sha256 = rx.finish(&trailer)?;
        // Every chunk is in: the slot (which bounds uploads receiving chunks)
        // passes to the next upload now, so its transfer overlaps this one's
        // fsync instead of waiting for the disk.
        drop(permit);
        let update = AcceptedUpdate {
            org_id: self.org.to_string(),
            sha256: sha256.clone(),
            num_examples: header.num_examples,
            train_loss: header.train_loss,
        };
        let spill = match rx_masked {
            // A masked update cannot be folded in again after a restart (its
            // masks die with the attempt's keys), so it is not recorded for that.
            true => spill,
            false => self.make_durable(&update, encoding, spill).await?,
        };
        let accepted_in_round = self.count_accepted(upload_id, update)?;
        *unfinished = None;
        if !self.shared.config.durable_updates && !self.keeps_spill() {
            let _ = std::fs::remove_file(spill.path());
        }
        Ok((sha256, accepted_in_round))
    }

    /// Reads chunks until the trailer: each checked, spilled, then folded. A
    /// stream that breaks or goes quiet keeps what arrived for resumption.
    async fn receive_chunks(
        &self,
        stream: &mut Streaming<pb::UpdateMessage>,
        mut rx: DeltaReceiver,
        mut spill: Spill,
        upload_id: u64,
        unfinished: &mut Option<u64>,
    ) -> Result<(DeltaReceiver, Spill, pb::UpdateTrailer)> {
        let idle = self.shared.config.limits.transfer_idle();
        loop {
            let part = match next_part(stream, idle).await {
                Ok(part) => part,
                // The connection broke or went quiet: keep what arrived (folded)
                // so the participant can resume from the next chunk.
                Err(e @ CoordinatorError::Aborted(_)) => {
                    if self.keep_partial(rx, spill, upload_id) {
                        *unfinished = None;
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            match part {
                pb::update_message::Part::Chunk(c) => {
                    self.shared
                        .metrics
                        .received_bytes
                        .inc_by(c.data.len() as u64);
                    let checked = rx.push(&c)?;
                    spill = spill_off_runtime(spill, c.data).await?;
                    self.fold_chunk(upload_id, &checked)?;
                }
                pb::update_message::Part::Trailer(mut t) => {
                    settle_trailer(&mut t, self.header)?;
                    return Ok((rx, spill, t));
                }
                pb::update_message::Part::Header(_) => {
                    return Err(CoordinatorError::InvalidArgument(
                        "a second header arrived in the same upload".into(),
                    ));
                }
            }
        }
    }

    /// The update is acknowledged only once it would survive a crash: its spill
    /// fsynced and recorded (outside the lock, so an fsync does not stall the
    /// other participants' requests). Both wait for the disk: on a blocking
    /// thread, so the runtime's few workers keep serving the others meanwhile.
    async fn make_durable(
        &self,
        update: &AcceptedUpdate,
        encoding: UpdateEncoding,
        mut spill: Spill,
    ) -> Result<Spill> {
        if !self.shared.config.durable_updates {
            return Ok(spill);
        }
        let shared = self.shared.clone();
        let record = StoredContribution::new(update, encoding, spill.path());
        let (training_id, round) = (self.header.training_id.clone(), self.header.round);
        tokio::task::spawn_blocking(move || {
            spill.sync()?;
            shared
                .store
                .put_contribution(&training_id, round, &record)?;
            Ok::<_, CoordinatorError>(spill)
        })
        .await
        .map_err(|e| CoordinatorError::Store(format!("recording the update: {e}")))?
    }

    /// Whether the round's robust rule reads this update back from its spill.
    fn keeps_spill(&self) -> bool {
        self.shared
            .training()
            .as_ref()
            .is_some_and(|t| super::aggregate::keeps_spills(&t.plan))
    }

    /// Counts a complete, durable update as accepted in its round, if the round
    /// is still open and the upload still this organisation's current one.
    fn count_accepted(&self, upload_id: u64, update: AcceptedUpdate) -> Result<u32> {
        let (org, round) = (self.org, self.header.round);
        let mut guard = self.shared.training();
        let t = current_training(&mut guard, &self.header.training_id)?;
        let ours = t.phase == Phase::Training
            && t.round == round
            && t.folding.get(org).is_some_and(|f| f.upload_id == upload_id);
        if !ours {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "round {round} closed while this update was being received"
            )));
        }
        if let Some(attempt) = t.secure.as_mut() {
            // Counted by the protocol first: one that cannot be (unmasking
            // began) is undone by the caller, as if it had never arrived.
            attempt.masked_input_accepted(org)?;
        }
        if let Some(f) = t.folding.remove(org)
            && super::aggregate::keeps_spills(&t.plan)
        {
            let kept = crate::transfer::spill::SpilledUpdate {
                org_id: org.to_string(),
                path: f.spill,
                encoding: f.encoding,
                weight: f.weight,
            };
            t.spilled.insert(org.to_string(), kept);
        }
        t.accumulator
            .as_mut()
            .expect("a training round has an accumulator")
            .commit();
        t.accepted.insert(org.to_string(), update);
        Ok(t.accepted.len() as u32)
    }

    /// A fresh upload (receiver, spill file, weight reserved in the accumulator,
    /// an undo entry), or the one kept from this organisation's broken-off upload
    /// when the header asks to resume it (and describes the same update).
    fn resume_or_new(&self, num_params: usize) -> Result<(DeltaReceiver, Spill, u64)> {
        if self.header.first_chunk == 0 {
            self.start_new(num_params)
        } else {
            self.resume_kept()
        }
    }

    fn start_new(&self, num_params: usize) -> Result<(DeltaReceiver, Spill, u64)> {
        let (org, header) = (self.org, self.header);
        let algorithm = delta_algorithm(header)?;
        // Two short lock sections around the spill file's creation (disk work
        // stays outside the lock): one allocates the upload, one reserves its
        // weight. A new upload first replaces whatever was kept of an earlier
        // one, whose undo reads its spill and so also runs outside the lock.
        let (encoding, upload_id, path) = loop {
            let mut guard = self.shared.training();
            let t = current_training(&mut guard, &header.training_id)?;
            if let Some(p) = t.partial.remove(org) {
                drop(guard);
                self.abandon(p.upload_id);
                continue;
            }
            t.next_upload_id += 1;
            let id = t.next_upload_id;
            break (
                t.plan.training.update_encoding,
                id,
                spill_path(&t.output_dir, header.round, org, id),
            );
        };
        let spill = Spill::create(&path, self.shared.config.durable_updates)?;
        let mut guard = self.shared.training();
        let t = current_training(&mut guard, &header.training_id)?;
        if t.phase != Phase::Training || t.round != header.round {
            drop(guard);
            let _ = std::fs::remove_file(&path);
            return Err(CoordinatorError::FailedPrecondition(format!(
                "round {} closed before this update could start",
                header.round
            )));
        }
        let weight = t.fold_weight(header.num_examples);
        let norm_bound = super::aggregate::norm_bound(&t.plan);
        let acc = t
            .accumulator
            .as_mut()
            .expect("a training round has an accumulator");
        if let Err(e) = acc.reserve(weight) {
            drop(guard);
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        t.folding.insert(
            org.to_string(),
            Folding {
                upload_id,
                spill: path,
                encoding,
                masked: header.secure.is_some(),
                weight,
                folded: 0,
            },
        );
        let rx = DeltaReceiver::new(
            num_params,
            self.shared.config.limits.max_chunk_bytes,
            encoding,
            algorithm,
        );
        let rx = match (header.secure.is_some(), norm_bound) {
            (true, _) => rx.masked(),
            (false, Some((bound, key))) => rx.bounding_norm(bound, key),
            (false, None) => rx,
        };
        Ok((rx, spill, upload_id))
    }

    /// The kept part of this organisation's broken-off upload, if the header
    /// describes the same update and resumes at the next chunk.
    fn resume_kept(&self) -> Result<(DeltaReceiver, Spill, u64)> {
        let (org, header) = (self.org, self.header);
        let mut guard = self.shared.training();
        let Some(t) = guard.as_mut() else {
            return Err(CoordinatorError::FailedPrecondition(
                "no training is running".into(),
            ));
        };
        let matches = t.partial.get(org).is_some_and(|p| {
            !header.delta_sha256.is_empty()
                && p.round == header.round
                && p.base_model_sha256 == header.base_model_sha256
                && p.num_examples == header.num_examples
                && p.delta_sha256 == header.delta_sha256
                && p.receiver.next_index() == header.first_chunk
                && p.receiver.is_masked() == header.secure.is_some()
        });
        // A mismatching request leaves the kept part alone: the right resume may follow.
        match if matches { t.partial.remove(org) } else { None } {
            Some(p) => {
                tracing::info!(
                    org,
                    round = header.round,
                    from = header.first_chunk,
                    "upload resumed"
                );
                Ok((p.receiver, p.spill, p.upload_id))
            }
            _ => Err(CoordinatorError::FailedPrecondition(format!(
                "nothing kept to resume from chunk {}: ask UploadProgress, or start again from chunk 0",
                header.first_chunk
            ))),
        }
    }

    /// Keeps a broken-off upload for resumption, if it declared its digest and
    /// there is room (at most `max_concurrent_uploads` are kept). Its folded chunks
    /// stay in the accumulator; false means it was not kept (the caller undoes it).
    fn keep_partial(&self, mut receiver: DeltaReceiver, spill: Spill, upload_id: u64) -> bool {
        let (org, header) = (self.org, self.header);
        if header.delta_sha256.is_empty() || receiver.next_index() == 0 {
            return false;
        }
        let mut guard = self.shared.training();
        let Some(t) = guard.as_mut() else {
            return false;
        };
        let ours = t.folding.get(org).is_some_and(|f| f.upload_id == upload_id);
        if !ours
            || t.round != header.round
            || t.partial.len() >= self.shared.config.limits.max_concurrent_uploads
        {
            return false;
        }
        tracing::info!(
            org,
            round = header.round,
            chunks = receiver.next_index(),
            "kept a broken-off upload for resumption"
        );
        receiver.release_buffer();
        t.partial.insert(
            org.to_string(),
            PartialUpload {
                round: header.round,
                base_model_sha256: header.base_model_sha256.clone(),
                num_examples: header.num_examples,
                delta_sha256: header.delta_sha256.clone(),
                receiver,
                spill,
                upload_id,
            },
        );
        true
    }

    /// Folds one checked chunk into the round's accumulator, if the upload is still
    /// this round's (the round may have closed, and undone it, meanwhile).
    fn fold_chunk(&self, upload_id: u64, chunk: &CheckedChunk) -> Result<()> {
        let (org, header) = (self.org, self.header);
        let mut guard = self.shared.training();
        let t = current_training(&mut guard, &header.training_id)?;
        let open = t.phase == Phase::Training && t.round == header.round;
        let Some(f) = t
            .folding
            .get_mut(org)
            .filter(|f| open && f.upload_id == upload_id)
        else {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "round {} closed while this update was being received",
                header.round
            )));
        };
        let start = sangsaeng_common::process::thread_cpu_time();
        // All or nothing: a refused chunk is not folded, so it is not counted.
        let acc = t
            .accumulator
            .as_mut()
            .expect("a training round has an accumulator");
        let folded = match chunk.payload {
            Payload::Values(values) => acc.fold(chunk.offset, values, f.weight),
            Payload::Masked(words) => acc.fold_masked(chunk.offset, words),
        };
        t.fold_time += sangsaeng_common::process::thread_cpu_time().saturating_sub(start);
        folded?;
        f.folded += 1;
        Ok(())
    }

    /// Undoes an upload that will not be accepted, unless the round driver already
    /// did (it undoes every unfinished upload when it closes the round).
    fn abandon(&self, upload_id: u64) {
        let (org, round) = (self.org, self.header.round);
        let entry = {
            let mut guard = self.shared.training();
            let Some(t) = guard.as_mut() else { return };
            if t.folding.get(org).is_none_or(|f| f.upload_id != upload_id) {
                return;
            }
            t.partial.remove(org);
            t.undoing += 1;
            t.folding.remove(org).expect("checked above")
        };
        undo(self.shared, round, entry);
        if let Some(t) = self.shared.training().as_mut() {
            t.undoing = t.undoing.saturating_sub(1);
        }
        self.shared.notify();
    }
}

/// Appends a chunk to the spill before it is folded, so an undo can always read
/// back every folded chunk. On a blocking thread: a direct write waits for the
/// disk (and a buffered one may be throttled by the kernel's dirty-page limit),
/// which would otherwise stall every other transfer on this worker.
async fn spill_off_runtime(mut spill: Spill, data: bytes::Bytes) -> Result<Spill> {
    tokio::task::spawn_blocking(move || spill.append(&data).map(|()| spill))
        .await
        .map_err(|e| CoordinatorError::Store(format!("spilling a chunk: {e}")))?
}

/// The next part of an upload, bounded by the idle timeout.
async fn next_part(
    s: &mut Streaming<pb::UpdateMessage>,
    idle: std::time::Duration,
) -> Result<pb::update_message::Part> {
    match tokio::time::timeout(idle, s.message()).await {
        Err(_) => Err(CoordinatorError::Aborted(format!(
            "upload idle for more than {}s",
            idle.as_secs()
        ))),
        // tonic's decoder could not read the message: the caller sent bytes that are not
        // an UpdateMessage (INTERNAL, as gRPC reports parse errors) or one above the
        // message size limit. Neither gets better by retrying, unlike a broken stream.
        Ok(Err(status))
            if status.code() == tonic::Code::Internal && status.message().contains("decod") =>
        {
            Err(CoordinatorError::InvalidArgument(format!(
                "upload message could not be decoded: {}",
                status.message()
            )))
        }
        Ok(Err(status)) if status.code() == tonic::Code::OutOfRange => {
            Err(CoordinatorError::ResourceExhausted(format!(
                "upload message refused: {}",
                status.message()
            )))
        }
        Ok(Err(status)) => Err(CoordinatorError::Aborted(format!(
            "upload stream broke: {}",
            status.message()
        ))),
        Ok(Ok(None)) => Err(CoordinatorError::InvalidArgument(
            "upload stream ended before its trailer (truncated)".into(),
        )),
        Ok(Ok(Some(m))) => m.part.ok_or_else(|| {
            CoordinatorError::InvalidArgument("upload message with no part set".into())
        }),
    }
}

/// Whether `org` may upload (or reserve an upload slot) for `round` of training
/// `t`: the round is open, `org` was asked for an update and has neither
/// delivered one nor an upload in progress. Shared by the upload's header check
/// and the reservation, so a slot is never held for an upload that would be
/// refused and a caller never holds two.
pub(crate) fn may_upload(t: &Training, org: &str, round: u32) -> Result<()> {
    if t.phase != Phase::Training {
        return Err(CoordinatorError::FailedPrecondition(format!(
            "training {} is not collecting updates (phase: {})",
            t.id,
            t.phase.name()
        )));
    }
    if round != t.round {
        let when = if round < t.round { "closed" } else { "future" };
        return Err(CoordinatorError::FailedPrecondition(format!(
            "update for {when} round {round}; round {} is in progress",
            t.round
        )));
    }
    if !t.selected.contains(org) {
        return Err(CoordinatorError::FailedPrecondition(format!(
            "this organisation was not selected for round {}",
            t.round
        )));
    }
    if t.accepted.contains_key(org) || t.uploading.contains_key(org) {
        return Err(CoordinatorError::AlreadyExists(format!(
            "an update for round {} was already received from this organisation, or is being received",
            t.round
        )));
    }
    Ok(())
}

/// Clears the caller's in-progress upload mark however the upload ends (unless
/// a newer upload of the same caller has replaced it).
struct UploadMark<'a> {
    shared: &'a Shared,
    org: String,
    id: u64,
}

impl Drop for UploadMark<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.shared.training().as_mut()
            && t.uploading.get(&self.org) == Some(&self.id)
        {
            t.uploading.remove(&self.org);
        }
    }
}

/// Subtracts the folded chunks of an unfinished upload and gives back its weight,
/// so the accumulator is exactly as if the upload had never arrived.
fn undo(shared: &Shared, round: u32, f: Folding) {
    let unfold = |offset: usize, values: &[f32], _: &[u8]| {
        if let Some(acc) = shared
            .training()
            .as_mut()
            .filter(|t| t.round == round)
            .and_then(|t| t.accumulator.as_mut())
        {
            acc.unfold(offset, values, f.weight);
        }
        Ok(())
    };
    let masked_offset = std::cell::Cell::new(0usize);
    let unfold_masked = |_: u32, data: &[u8]| {
        let mut words = Vec::new();
        sangsaeng_common::privacy::secagg::wire::decode_words(data, &mut words)?;
        if let Some(acc) = shared
            .training()
            .as_mut()
            .filter(|t| t.round == round)
            .and_then(|t| t.accumulator.as_mut())
        {
            acc.unfold_masked(masked_offset.get(), &words);
        }
        masked_offset.set(masked_offset.get() + words.len());
        Ok(())
    };
    let read = match f.masked {
        false if f.folded > 0 => read_spill(&f.spill, f.encoding, Some(f.folded), unfold),
        true if f.folded > 0 => read_spill_raw(&f.spill, Some(f.folded), unfold_masked),
        _ => Ok(()),
    };
    if let Err(e) = read {
        // The spill was written by this process moments ago; failing to read it
        // back means the disk is failing. The round cannot be trusted any more.
        tracing::error!(spill = %f.spill.display(), "could not undo a refused update: {e}");
        if let Some(t) = shared.training().as_mut().filter(|t| t.round == round) {
            t.undo_failed = Some(format!("could not undo a refused update: {e}"));
        }
    }
    if let Some(acc) = shared
        .training()
        .as_mut()
        .filter(|t| t.round == round)
        .and_then(|t| t.accumulator.as_mut())
    {
        acc.release(f.weight);
    }
    let _ = std::fs::remove_file(&f.spill);
}

/// Called by the round driver once the round is closed: undoes every upload that
/// is still folding in or kept for resumption, and waits for undos in progress.
pub async fn undo_unfinished_uploads(shared: &Arc<Shared>) -> Result<()> {
    let (round, entries) = {
        let mut guard = shared.training();
        let t = guard.as_mut().expect("training");
        t.partial.clear();
        (t.round, std::mem::take(&mut t.folding))
    };
    if !entries.is_empty() {
        tracing::info!(
            round,
            uploads = entries.len(),
            "undoing unfinished uploads of the closed round"
        );
        let s = shared.clone();
        tokio::task::spawn_blocking(move || {
            for (_, f) in entries {
                undo(&s, round, f);
            }
        })
        .await
        .map_err(|e| CoordinatorError::Store(format!("undoing uploads: {e}")))?;
    }
    loop {
        // Created before the check so a notification in between is not missed.
        let notified = shared.progress.notified();
        {
            let mut guard = shared.training();
            let Some(t) = guard.as_mut() else {
                return Ok(());
            };
            if let Some(e) = t.undo_failed.take() {
                return Err(CoordinatorError::Store(format!(
                    "round {round}: {e}; the round's aggregate cannot be trusted"
                )));
            }
            if t.undoing == 0 {
                return Ok(());
            }
        }
        notified.await;
    }
}
