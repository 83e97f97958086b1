//! This site's side of a secure-aggregation round: fresh keys per attempt,
//! the signed advert, checking every neighbour's advert before sharing
//! anything, the masked upload, and the answers to unmasking requests.
//!
//! Nothing the coordinator relays is taken on its word. Each advert must be
//! signed by the key of a certificate the federation CA issued to the
//! organisation the round lists at that index; unmasking requests must be
//! consistent with everything asked before (the core refuses to reveal both
//! secrets of one neighbour). A refusal is [`ParticipantError::Refused`]: the
//! site sits the step out and stays in the training.
//!
//! The attempt's keys live only in memory: a site that restarts mid-round
//! simply drops out of that attempt (its neighbours' shares cover it).

use std::sync::{Arc, Mutex};

use sangsaeng_common::identity::peer::PeerVerifier;
use sangsaeng_common::identity::signing::Signer;
use sangsaeng_common::identity::tls::TlsMaterial;
use sangsaeng_common::privacy::dp::client_noise::NoiseShare;
use sangsaeng_common::privacy::secagg::{self, Advert, RoundContext, wire};
use sangsaeng_common::transfer::digest::{self, DigestAlgorithm};
use sangsaeng_common::transfer::wire::MaskedChunks;
use sangsaeng_proto::v1 as pb;

use crate::error::{ParticipantError, Result};
use crate::spill::MaskedSpill;

/// Who this site is in secure rounds: its organisation (from its certificate),
/// the key it signs adverts with (its TLS key), and the CA it checks peers by.
pub struct Identity {
    pub org_id: String,
    signer: Signer,
    peers: PeerVerifier,
}

impl Identity {
    pub fn from_tls(m: &TlsMaterial) -> Result<Self> {
        let leaf = sangsaeng_common::identity::pki::first_cert_der(&m.cert_pem)
            .map_err(|e| ParticipantError::Config(format!("own certificate: {e}")))?;
        Ok(Identity {
            org_id: sangsaeng_common::identity::tls::identity_from_der(&leaf)?,
            signer: Signer::from_pem(m.key_pem.as_bytes())?,
            peers: PeerVerifier::new(&m.ca_pem)?,
        })
    }
}

fn refused(e: impl std::fmt::Display) -> ParticipantError {
    ParticipantError::Refused(e.to_string())
}

/// One attempt of a secure round at this site.
pub struct SecureRound {
    training_id: String,
    ctx: RoundContext,
    wire: pb::SecureRound,
    me: Arc<Mutex<secagg::Participant>>,
    advert: pb::SignedAdvert,
    /// The sealed shares once made: sent again (never made again) if asked twice.
    outbox: Option<Vec<Vec<u8>>>,
    inbox_received: bool,
    /// This site's share of the client-level noise, drawn once per attempt so
    /// that the digest pass, the upload and a resumed upload add the same.
    noise: Option<Option<NoiseShare>>,
}

impl SecureRound {
    /// Starts the attempt `wire` of `round` with fresh keys and signs their advert.
    pub fn begin(
        id: &Identity,
        training_id: &str,
        round: u32,
        wire: pb::SecureRound,
    ) -> Result<Self> {
        let ctx = wire::context(training_id, round, wire.attempt)?;
        if wire.participants.len() > wire::MAX_SECURE_PARTICIPANTS {
            return Err(refused(format!(
                "{ctx}: the round lists {} participants, more than {}",
                wire.participants.len(),
                wire::MAX_SECURE_PARTICIPANTS
            )));
        }
        let index = wire
            .participants
            .iter()
            .position(|o| *o == id.org_id)
            .ok_or_else(|| {
                refused(format!(
                    "{ctx}: the round does not list this site ('{}')",
                    id.org_id
                ))
            })?;
        let me = secagg::Participant::new(ctx.clone(), index as u32, &id.org_id)?;
        let advert = wire::sign_advert(&ctx, me.advert(), &id.signer)?;
        Ok(SecureRound {
            training_id: training_id.to_string(),
            ctx,
            wire,
            me: Arc::new(Mutex::new(me)),
            advert,
            outbox: None,
            inbox_received: false,
            noise: None,
        })
    }

    pub fn matches(&self, training_id: &str, round: u32, attempt: u32) -> bool {
        self.training_id == training_id
            && self.ctx.round() == round
            && self.ctx.attempt() == attempt
    }

    pub fn index(&self) -> u32 {
        self.advert.participant
    }

    fn message(&self, step: pb::secure_aggregation_message::Step) -> pb::SecureAggregationMessage {
        pb::SecureAggregationMessage {
            training_id: self.training_id.clone(),
            round: self.ctx.round(),
            attempt: self.ctx.attempt(),
            step: Some(step),
        }
    }

    /// Step 1's message: this site's signed advert.
    pub fn advert_message(&self) -> pb::SecureAggregationMessage {
        self.message(pb::secure_aggregation_message::Step::Advert(
            self.advert.clone(),
        ))
    }

    /// Step 2: checks every relayed advert, then shares this site's secrets
    /// among its neighbours.
    pub fn share_keys(
        &mut self,
        id: &Identity,
        step: &pb::ShareKeysStep,
    ) -> Result<pb::SecureAggregationMessage> {
        if self.outbox.is_none() {
            let adverts = self.verified_adverts(id, step)?;
            let config = wire::round_config(&self.ctx, &self.wire, &adverts).map_err(refused)?;
            let sealed = self
                .me
                .lock()
                .expect("the round's state")
                .share_keys(config, &adverts)
                .map_err(refused)?;
            self.outbox = Some(wire::sealed_to_proto(&sealed));
        }
        let sealed = self.outbox.clone().expect("made above");
        Ok(self.message(pb::secure_aggregation_message::Step::Shares(
            pb::SealedShares { sealed },
        )))
    }

    fn verified_adverts(&self, id: &Identity, step: &pb::ShareKeysStep) -> Result<Vec<Advert>> {
        if step.adverts.len() > self.wire.participants.len() {
            return Err(refused(format!(
                "{}: {} adverts for a round of {} participants",
                self.ctx,
                step.adverts.len(),
                self.wire.participants.len()
            )));
        }
        let mut adverts = Vec::with_capacity(step.adverts.len());
        for a in &step.adverts {
            let advert = wire::verify_advert(&self.ctx, a, &self.wire.participants, &id.peers)
                .map_err(refused)?;
            if advert.participant == self.index() && a.c_pk != self.advert.c_pk {
                return Err(refused(format!(
                    "{}: the relayed advert for this site carries keys it never made",
                    self.ctx
                )));
            }
            adverts.push(advert);
        }
        Ok(adverts)
    }

    /// Step 3 (first half): the neighbours' sealed shares for this site.
    pub fn receive_shares(&mut self, step: &pb::MaskInputStep) -> Result<()> {
        if self.inbox_received {
            return Ok(());
        }
        let inbox = step
            .sealed
            .iter()
            .map(|b| wire::sealed_from_proto(&self.ctx, b))
            .collect::<sangsaeng_common::Result<Vec<_>>>()
            .map_err(refused)?;
        self.me
            .lock()
            .expect("the round's state")
            .receive_shares(&inbox)
            .map_err(refused)?;
        self.inbox_received = true;
        Ok(())
    }

    /// Draws the attempt's noise share (`None`: the plan adds none) on the
    /// first call only, so every pass masks with the same noise.
    pub fn draw_noise_once(
        &mut self,
        draw: impl FnOnce() -> Result<Option<NoiseShare>>,
    ) -> Result<()> {
        if self.noise.is_none() {
            self.noise = Some(draw()?);
        }
        Ok(())
    }

    /// Step 3 (second half): what masks this site's update, movable to a
    /// blocking thread.
    pub fn masker(&self) -> Masker {
        Masker {
            noise: self.noise.clone().flatten(),
            me: self.me.clone(),
            input: pb::SecureInput {
                attempt: self.ctx.attempt(),
                participant: self.index(),
            },
        }
    }

    /// Step 4: the shares an unmasking request asks for, if it is consistent.
    pub fn unmask(&mut self, step: &pb::UnmaskStep) -> Result<pb::SecureAggregationMessage> {
        let request = wire::unmask_request_from_proto(step);
        let response = self
            .me
            .lock()
            .expect("the round's state")
            .unmask(&request)
            .map_err(refused)?;
        Ok(self.message(pb::secure_aggregation_message::Step::Unmask(
            wire::unmask_response_to_proto(&response),
        )))
    }
}

/// Masks one update of one attempt.
#[derive(Clone)]
pub struct Masker {
    me: Arc<Mutex<secagg::Participant>>,
    noise: Option<NoiseShare>,
    input: pb::SecureInput,
}

impl Masker {
    /// The masked upload's chunks and the digest of all of them: one pass of
    /// masking before the upload, so that the digest can be declared up front
    /// and a broken upload resumed. The pass keeps what it masked in a
    /// [`MaskedSpill`], so the upload reads the chunks back rather than masking
    /// twice, without holding the masked update (twice the model's size) in
    /// memory.
    pub fn chunks(
        self,
        values: Arc<Vec<f32>>,
        weight: u64,
        chunk_bytes: usize,
        algorithm: DigestAlgorithm,
    ) -> Result<(MaskedChunks, String)> {
        let per = wire::words_per_chunk(chunk_bytes);
        let count = values.len().div_ceil(per);
        let (me, noise) = (self.me, self.noise);
        let make = move |i: usize| -> sangsaeng_common::Result<bytes::Bytes> {
            let start = i * per;
            let end = (start + per).min(values.len());
            let me = me.lock().expect("the round's state");
            wire::masked_chunk(
                &me,
                &values[start..end],
                start as u64,
                weight,
                noise.as_ref(),
            )
            .map(bytes::Bytes::from)
        };
        let mut hasher = digest::Hasher::new(algorithm);
        let mut spill = MaskedSpill::new(per * wire::WORD_BYTES);
        for i in 0..count {
            let c = make(i)?;
            hasher.update(&c);
            spill.push(&c);
        }
        let chunk: Arc<dyn Fn(usize) -> Option<bytes::Bytes> + Send + Sync> = match spill.finish() {
            Some(kept) => Arc::new(move |i: usize| match kept.read(i) {
                Ok(b) => Some(bytes::Bytes::from(b)),
                Err(e) => {
                    tracing::error!(
                        "cannot read masked chunk {i} back from its temporary file: {e}"
                    );
                    None
                }
            }),
            None => Arc::new(move |i: usize| match make(i) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::error!("cannot mask chunk {i}: {e}");
                    None
                }
            }),
        };
        let masked = MaskedChunks {
            input: self.input,
            count,
            chunk,
        };
        Ok((masked, hasher.finalize_id()))
    }
}
