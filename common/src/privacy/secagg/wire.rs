//! The secure-aggregation messages of `sangsaeng.v1` and the core's types:
//! parsing every field a peer or the coordinator sends (lengths, indices),
//! signing and verifying adverts with the TLS keys, the round's configuration
//! from a `SecureRound`, and the masked words of an upload.
//!
//! Everything that arrives here is hostile until checked: a parse error names
//! the field and the round, and nothing is trusted because the coordinator
//! relayed it (the coordinator is the party secure aggregation guards against).

use sangsaeng_proto::v1 as pb;

use super::context::RoundContext;
use super::graph::{Graph, graph_seed};
use super::keys::{Advert, KEY_LEN};
use super::participant::Participant;
use super::protocol::{RoundConfig, UnmaskRequest, UnmaskResponse, validate_threshold};
use super::sealed::SealedSharePair;
use super::shamir::Share;
use crate::aggregation::fedavg::weighted_fixed_point;
use crate::identity::peer::PeerVerifier;
use crate::identity::signing::Signer;
use crate::privacy::dp::client_noise::NoiseShare;
use crate::{Error, Result};

/// Bytes per masked value on the wire: one little-endian word of Z_2^64.
pub const WORD_BYTES: usize = 8;

/// Most participants a `SecureRound` may list (bounds what a hostile
/// coordinator can make a participant allocate; SecAgg+ at 1,000 is the goal).
pub const MAX_SECURE_PARTICIPANTS: usize = 1 << 16;

fn key(ctx: &RoundContext, what: &str, bytes: &[u8]) -> Result<[u8; KEY_LEN]> {
    bytes.try_into().map_err(|_| {
        ctx.error(format!(
            "{what} must be {KEY_LEN} bytes, got {}",
            bytes.len()
        ))
    })
}

/// The context of attempt `attempt` of `round` of `training_id`.
pub fn context(training_id: &str, round: u32, attempt: u32) -> Result<RoundContext> {
    RoundContext::new(training_id, round, attempt)
}

/// An advert as sent: its fields and the participant's signature over its
/// canonical bytes, made with the key of its TLS certificate.
pub fn sign_advert(
    ctx: &RoundContext,
    advert: &Advert,
    signer: &Signer,
) -> Result<pb::SignedAdvert> {
    Ok(pb::SignedAdvert {
        participant: advert.participant,
        org_id: advert.org_id.clone(),
        c_pk: advert.c_pk.to_vec().into(),
        s_pk: advert.s_pk.to_vec().into(),
        b_commitment: advert.b_commitment.to_vec().into(),
        signature: signer.sign(&advert.signing_bytes(ctx))?.into(),
        certificate: Default::default(),
    })
}

/// The advert's fields, checked for length only (no signature check).
pub fn advert_from_proto(ctx: &RoundContext, a: &pb::SignedAdvert) -> Result<Advert> {
    let advert = Advert {
        participant: a.participant,
        org_id: a.org_id.clone(),
        c_pk: key(ctx, "an advert's c_pk", &a.c_pk)?,
        s_pk: key(ctx, "an advert's s_pk", &a.s_pk)?,
        b_commitment: key(ctx, "an advert's b_commitment", &a.b_commitment)?,
    };
    advert.validate(ctx)?;
    Ok(advert)
}

/// Checks a relayed advert end to end: the certificate is the federation's
/// and names the organisation the round lists at that index, and the
/// signature over this round's advert bytes is that certificate's key. A
/// coordinator that substitutes keys, moves them between participants or
/// replays an advert of another round or attempt fails here.
pub fn verify_advert(
    ctx: &RoundContext,
    a: &pb::SignedAdvert,
    participants: &[String],
    peers: &PeerVerifier,
) -> Result<Advert> {
    let advert = advert_from_proto(ctx, a)?;
    let i = advert.participant as usize;
    let listed = participants.get(i).ok_or_else(|| {
        ctx.error(format!(
            "an advert names participant {i}, but the round lists {}",
            participants.len()
        ))
    })?;
    if *listed != advert.org_id {
        return Err(ctx.error(format!(
            "participant {i}'s advert claims organisation '{}', but the round lists '{listed}' there",
            advert.org_id
        )));
    }
    let (cert_org, verifier) = peers
        .verify(&a.certificate)
        .map_err(|e| ctx.error(format!("participant {i}'s advert: {e}")))?;
    if cert_org != advert.org_id {
        return Err(ctx.error(format!(
            "participant {i}'s advert claims organisation '{}' but comes with the certificate of '{cert_org}'",
            advert.org_id
        )));
    }
    verifier
        .verify(&advert.signing_bytes(ctx), &a.signature)
        .map_err(|e| {
            ctx.error(format!(
                "participant {i}'s ('{}') advert signature is not valid for this round: {e}",
                advert.org_id
            ))
        })?;
    Ok(advert)
}

/// The public parameters of an attempt: the graph (complete when the degree
/// is participants − 1, else the k-regular graph seeded by every advert) and
/// the threshold, checked.
pub fn round_config(
    ctx: &RoundContext,
    secure: &pb::SecureRound,
    adverts: &[Advert],
) -> Result<RoundConfig> {
    let n = secure.participants.len();
    if !(3..=MAX_SECURE_PARTICIPANTS).contains(&n) {
        return Err(ctx.error(format!(
            "a secure round needs 3 to {MAX_SECURE_PARTICIPANTS} participants, this one lists {n}"
        )));
    }
    let n = n as u32;
    let graph = if secure.degree + 1 >= n {
        Graph::complete(n)?
    } else {
        Graph::harary(n, secure.degree, Some(&graph_seed(ctx, adverts)))?
    };
    validate_threshold(secure.threshold as usize, graph.degree())?;
    RoundConfig::new(ctx.clone(), graph, secure.threshold as usize)
}

/// A sealed share pair from the wire.
pub fn sealed_from_proto(ctx: &RoundContext, bytes: &[u8]) -> Result<SealedSharePair> {
    SealedSharePair::from_bytes(ctx, bytes)
}

pub fn sealed_to_proto(sealed: &[SealedSharePair]) -> Vec<Vec<u8>> {
    sealed.iter().map(|s| s.to_bytes().to_vec()).collect()
}

/// An unmasking request from the wire.
pub fn unmask_request_from_proto(step: &pb::UnmaskStep) -> UnmaskRequest {
    UnmaskRequest {
        dropped: step.dropped.clone(),
        survivors: step.survivors.clone(),
    }
}

pub fn unmask_request_to_proto(r: &UnmaskRequest) -> pb::UnmaskStep {
    pb::UnmaskStep {
        survivors: r.survivors.clone(),
        dropped: r.dropped.clone(),
    }
}

pub fn unmask_response_to_proto(r: &UnmaskResponse) -> pb::UnmaskShares {
    let owned = |list: &[(u32, Share)]| {
        list.iter()
            .map(|(owner, share)| pb::OwnedShare {
                owner: *owner,
                share: share.as_bytes().to_vec(),
            })
            .collect()
    };
    pb::UnmaskShares {
        self_mask_shares: owned(&r.self_mask_shares),
        mask_key_shares: owned(&r.mask_key_shares),
    }
}

/// Participant `participant`'s answer from the wire (share lengths checked;
/// which shares were asked for is the coordinator's state machine's check).
pub fn unmask_response_from_proto(
    ctx: &RoundContext,
    participant: u32,
    m: &pb::UnmaskShares,
) -> Result<UnmaskResponse> {
    let parse = |list: &[pb::OwnedShare]| -> Result<Vec<(u32, Share)>> {
        list.iter()
            .map(|s| {
                Share::from_bytes(&s.share)
                    .map(|share| (s.owner, share))
                    .map_err(|e| {
                        ctx.error(format!(
                            "participant {participant}'s share of participant {}: {e}",
                            s.owner
                        ))
                    })
            })
            .collect()
    };
    Ok(UnmaskResponse {
        participant,
        self_mask_shares: parse(&m.self_mask_shares)?,
        mask_key_shares: parse(&m.mask_key_shares)?,
    })
}

/// Values per masked chunk of at most `chunk_bytes` bytes.
pub fn words_per_chunk(chunk_bytes: usize) -> usize {
    (chunk_bytes / WORD_BYTES).max(1)
}

/// One masked chunk as sent: the values of parameters `offset..` (already
/// quantised by the plan's encoding) as fixed-point words at `weight`, plus
/// the site's share of client-level noise if the plan has one (added before
/// the masks, so it survives unmasking and no one sees the update without
/// it), masked by `participant`, little-endian.
pub fn masked_chunk(
    participant: &Participant,
    values: &[f32],
    offset: u64,
    weight: u64,
    noise: Option<&NoiseShare>,
) -> Result<Vec<u8>> {
    let mut words = vec![0i64; values.len()];
    weighted_fixed_point(values, weight, &mut words)?;
    if let Some(noise) = noise {
        noise.add_to(offset, &mut words);
    }
    participant.mask_chunk(&mut words, offset)?;
    let mut out = Vec::with_capacity(words.len() * WORD_BYTES);
    for w in &words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    Ok(out)
}

/// The words of a masked chunk from the wire, into `out` (reused).
pub fn decode_words(data: &[u8], out: &mut Vec<i64>) -> Result<()> {
    if !data.len().is_multiple_of(WORD_BYTES) {
        return Err(Error::Protocol(format!(
            "a masked chunk must hold whole {WORD_BYTES}-byte words, this one has {} bytes",
            data.len()
        )));
    }
    out.clear();
    out.extend(
        data.chunks_exact(WORD_BYTES)
            .map(|w| i64::from_le_bytes(w.try_into().expect("8 bytes"))),
    );
    Ok(())
}
