//! Full in-memory rounds of secure aggregation: participants and coordinator
//! driven step by step, with dropouts, silent survivors, a coordinator that
//! cheats and participants that lie, over odd chunk sizes.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sangsaeng_common::privacy::secagg::{
    Advert, Coordinator, Graph, Participant, RoundConfig, RoundContext, RoundKeys, SealedSharePair,
    UnmaskRequest, default_threshold, graph_seed,
};

const PARAMS: usize = 10_007;
const INPUT_BOUND: i64 = 1 << 50;

/// How each participant behaves in a simulated round.
#[derive(Clone, Default)]
struct Script {
    /// Never send shares (drop between advertising and sharing).
    drop_before_sharing: BTreeSet<u32>,
    /// Share keys but never send a masked input.
    drop_before_input: BTreeSet<u32>,
    /// Send a masked input but never answer the unmasking request.
    silent: BTreeSet<u32>,
    /// Chunk size participants mask with, and the coordinator unmasks with.
    mask_chunk: usize,
    unmask_chunk: usize,
}

impl Script {
    fn new() -> Self {
        Script {
            mask_chunk: 777,
            unmask_chunk: 1013,
            ..Script::default()
        }
    }
}

struct Round {
    config: RoundConfig,
    participants: Vec<Participant>,
    coordinator: Coordinator,
    inputs: Vec<Vec<i64>>,
    masked: BTreeMap<u32, Vec<i64>>,
    masked_sum: Vec<i64>,
}

fn ctx() -> RoundContext {
    RoundContext::new("sim-training", 7, 0).unwrap()
}

fn inputs(n: u32, seed: u64) -> Vec<Vec<i64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            (0..PARAMS)
                .map(|_| rng.random_range(-INPUT_BOUND..=INPUT_BOUND))
                .collect()
        })
        .collect()
}

/// Advertises, builds the graph (complete when `k` is None), shares and routes.
fn start(n: u32, k: Option<u32>, script: &Script) -> Round {
    let ctx = ctx();
    let participants: Vec<Participant> = (0..n)
        .map(|i| Participant::new(ctx.clone(), i, &format!("org-{i}")).unwrap())
        .collect();
    let adverts: Vec<Advert> = participants.iter().map(|p| p.advert().clone()).collect();
    let graph = match k {
        None => Graph::complete(n).unwrap(),
        Some(k) => Graph::harary(n, k, Some(&graph_seed(&ctx, &adverts))).unwrap(),
    };
    // What each participant can check: the seed is the hash of the adverts.
    if let Some(seed) = graph.seed() {
        assert_eq!(seed, &graph_seed(&ctx, &adverts));
    }
    let t = default_threshold(graph.degree());
    let config = RoundConfig::new(ctx, graph, t).unwrap();
    let coordinator = Coordinator::new(config.clone(), adverts).unwrap();
    let mut round = Round {
        config,
        participants,
        coordinator,
        inputs: inputs(n, 42 + u64::from(n)),
        masked: BTreeMap::new(),
        masked_sum: vec![0; PARAMS],
    };
    let relayed = round.coordinator.adverts();
    let mut outboxes = Vec::new();
    for p in &mut round.participants {
        if script.drop_before_sharing.contains(&p.index()) {
            continue;
        }
        outboxes.push((
            p.index(),
            p.share_keys(round.config.clone(), &relayed).unwrap(),
        ));
    }
    let routing = round.coordinator.route_shares(outboxes).unwrap();
    for (i, inbox) in &routing.inboxes {
        round.participants[*i as usize]
            .receive_shares(inbox)
            .unwrap();
    }
    round
}

impl Round {
    /// Every participant that shared and does not drop masks its input chunk
    /// by chunk; the coordinator sums the masked chunks (wrapping).
    fn send_inputs(&mut self, script: &Script) {
        let shared = self.coordinator.shared().unwrap().clone();
        for i in shared {
            if script.drop_before_input.contains(&i) {
                continue;
            }
            let p = &self.participants[i as usize];
            let mut y = self.inputs[i as usize].clone();
            for (c, chunk) in y.chunks_mut(script.mask_chunk).enumerate() {
                p.mask_chunk(chunk, (c * script.mask_chunk) as u64).unwrap();
            }
            for (s, v) in self.masked_sum.iter_mut().zip(&y) {
                *s = s.wrapping_add(*v);
            }
            self.masked.insert(i, y);
            self.coordinator.record_masked_input(i).unwrap();
        }
    }

    /// Sends the requests, feeds back the answers (except from `silent`),
    /// passing each through `tamper`.
    fn unmask_with(
        &mut self,
        script: &Script,
        mut tamper: impl FnMut(&mut sangsaeng_common::privacy::secagg::UnmaskResponse),
    ) -> sangsaeng_common::Result<Vec<i64>> {
        let requests = self.coordinator.unmask_requests()?;
        for (i, request) in &requests {
            if script.silent.contains(i) {
                continue;
            }
            let mut response = self.participants[*i as usize].unmask(request)?;
            tamper(&mut response);
            self.coordinator.receive_unmask_response(response)?;
        }
        let unmasker = self.coordinator.finish()?;
        let mut sum = self.masked_sum.clone();
        for (c, chunk) in sum.chunks_mut(script.unmask_chunk).enumerate() {
            unmasker.unmask_chunk(chunk, (c * script.unmask_chunk) as u64)?;
        }
        Ok(sum)
    }

    fn unmask(&mut self, script: &Script) -> sangsaeng_common::Result<Vec<i64>> {
        self.unmask_with(script, |_| {})
    }

    fn plain_sum(&self, over: &BTreeSet<u32>) -> Vec<i64> {
        let mut sum = vec![0i64; PARAMS];
        for i in over {
            for (s, v) in sum.iter_mut().zip(&self.inputs[*i as usize]) {
                *s += *v;
            }
        }
        sum
    }

    fn everyone(&self) -> BTreeSet<u32> {
        (0..self.participants.len() as u32).collect()
    }
}

/// The error's text; panics (without printing a whole vector) on success.
fn error_text<T>(result: sangsaeng_common::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error, got success"),
        Err(e) => e.to_string(),
    }
}

fn run(n: u32, k: Option<u32>, script: &Script) -> (Round, Vec<i64>) {
    let mut round = start(n, k, script);
    round.send_inputs(script);
    let sum = round.unmask(script).unwrap();
    (round, sum)
}

// (a) No dropout: the unmasked sum is the plain sum, exactly.
#[test]
fn complete_graph_without_dropout_gives_exact_sum() {
    let script = Script::new();
    let (round, sum) = run(5, None, &script);
    assert_eq!(sum, round.plain_sum(&round.everyone()));
}

#[test]
fn sparse_graph_without_dropout_gives_exact_sum() {
    let script = Script::new();
    let (round, sum) = run(40, Some(8), &script);
    assert_eq!(sum, round.plain_sum(&round.everyone()));
    assert_eq!(round.participants[0].mask_partners().len(), 8);
}

// (b) One participant drops after the key exchange, before its masked input.
#[test]
fn dropout_after_key_exchange_gives_sum_of_survivors() {
    let mut script = Script::new();
    script.drop_before_input.insert(2);
    let (mut round, sum) = run(5, None, &script);
    let survivors: BTreeSet<u32> = [0, 1, 3, 4].into();
    assert_eq!(round.coordinator.survivors(), &survivors);
    assert_eq!(sum, round.plain_sum(&survivors));

    // The correction alone, for one chunk: masked − correction = plain.
    let unmasker = round.coordinator.finish().unwrap();
    assert_eq!(unmasker.dropped(), &[2]);
    assert_eq!(unmasker.keystreams(), 4 + 4);
    let (offset, len) = (1234, 999);
    let mut correction = vec![0u64; len];
    unmasker
        .correction_chunk(offset as u64, &mut correction)
        .unwrap();
    for p in 0..len {
        let masked = round.masked_sum[offset + p] as u64;
        assert_eq!(masked.wrapping_sub(correction[p]) as i64, sum[offset + p]);
    }
}

#[test]
fn sparse_graph_with_several_dropouts_gives_sum_of_survivors() {
    let mut script = Script::new();
    script.drop_before_input.extend([3, 17, 30]);
    script.drop_before_sharing.insert(11);
    let (round, sum) = run(40, Some(8), &script);
    let survivors: BTreeSet<u32> = (0..40).filter(|i| ![3, 11, 17, 30].contains(i)).collect();
    assert_eq!(round.coordinator.survivors(), &survivors);
    assert_eq!(sum, round.plain_sum(&survivors));
}

// (c) A participant that sent its input but does not answer: still the full sum.
#[test]
fn silent_survivor_is_still_in_the_sum() {
    let mut script = Script::new();
    script.silent.insert(1);
    let (round, sum) = run(5, None, &script);
    assert_eq!(sum, round.plain_sum(&round.everyone()));

    let mut script = Script::new();
    script.silent.extend([0, 20]);
    script.drop_before_input.insert(5);
    let (round, sum) = run(40, Some(8), &script);
    let survivors: BTreeSet<u32> = (0..40).filter(|i| *i != 5).collect();
    assert_eq!(sum, round.plain_sum(&survivors));
}

#[test]
fn dropout_before_sharing_is_left_out_cleanly() {
    let mut script = Script::new();
    script.drop_before_sharing.insert(4);
    let mut round = start(5, None, &script);
    let shared: BTreeSet<u32> = [0, 1, 2, 3].into();
    assert_eq!(round.coordinator.shared(), Some(&shared));
    assert_eq!(round.participants[0].mask_partners(), vec![1, 2, 3]);
    round.send_inputs(&script);
    let sum = round.unmask(&script).unwrap();
    assert_eq!(sum, round.plain_sum(&shared));
}

// (d) Fewer than t answers: a clear error naming a participant and the counts.
#[test]
fn fewer_than_threshold_answers_is_a_clear_error() {
    let mut script = Script::new();
    script.silent.extend([0, 1, 2]);
    let mut round = start(5, None, &script);
    round.send_inputs(&script);
    let err = error_text(round.unmask(&script));
    assert!(err.contains("round 7"), "{err}");
    assert!(
        err.contains("cannot recover participant 0's self-mask seed"),
        "{err}"
    );
    assert!(err.contains("only 2 of the 3 shares"), "{err}");
}

#[test]
fn too_many_dropouts_are_refused_before_any_share_is_asked_for() {
    let mut script = Script::new();
    script.drop_before_input.extend([0, 1]);
    let mut round = start(5, None, &script);
    round.send_inputs(&script);
    let err = round.coordinator.unmask_requests().unwrap_err().to_string();
    assert!(
        err.contains("only 2 of its neighbours sent masked inputs"),
        "{err}"
    );
}

// (e) A coordinator asking for both shares of one participant is refused.
#[test]
fn asking_for_both_secrets_of_one_participant_is_refused() {
    let script = Script::new();
    let mut round = start(5, None, &script);
    round.send_inputs(&script);
    let p = &mut round.participants[0];

    // j = 1 in both lists of one request.
    let both = UnmaskRequest {
        dropped: vec![1],
        survivors: vec![1, 2, 3, 4],
    };
    let err = p.unmask(&both).unwrap_err().to_string();
    assert!(
        err.contains("participant 1 as both dropped and surviving"),
        "{err}"
    );

    // First claimed dropped (s_sk share revealed)...
    let first = UnmaskRequest {
        dropped: vec![1],
        survivors: vec![2, 3, 4],
    };
    let response = p.unmask(&first).unwrap();
    assert_eq!(response.mask_key_shares.len(), 1);
    // ...then claimed surviving: its b share is refused.
    let second = UnmaskRequest {
        dropped: vec![],
        survivors: vec![1, 2, 3, 4],
    };
    let err = p.unmask(&second).unwrap_err().to_string();
    assert!(err.contains("participant 0"), "{err}");
    assert!(err.contains("participant 1 was reported dropped"), "{err}");
    // And the other way round.
    let third = UnmaskRequest {
        dropped: vec![2],
        survivors: vec![3, 4, 1],
    };
    assert!(p.unmask(&third).is_err());
    // The same request again is answered (a retry reveals nothing new).
    assert!(p.unmask(&first).is_ok());
    // Once unmasking began, the masked input is final.
    let mut late = vec![0i64; 3];
    assert!(p.mask_chunk(&mut late, 0).is_err());
}

#[test]
fn malformed_unmask_requests_are_refused() {
    let script = Script::new();
    let mut round = start(40, Some(8), &script);
    round.send_inputs(&script);
    let requests = round.coordinator.unmask_requests().unwrap();
    let good = requests[&0].clone();
    let p = &mut round.participants[0];
    let neighbours = p.mask_partners();
    let stranger = (1..40).find(|j| !neighbours.contains(j)).unwrap();

    let mut r = good.clone();
    r.survivors.push(stranger);
    let err = p.unmask(&r).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "names participant {stranger}, which is not a neighbour"
        )),
        "{err}"
    );

    let mut r = good.clone();
    r.dropped.push(0);
    assert!(
        p.unmask(&r)
            .unwrap_err()
            .to_string()
            .contains("itself as dropped")
    );

    let mut r = good.clone();
    r.survivors.push(r.survivors[0]);
    assert!(p.unmask(&r).unwrap_err().to_string().contains("twice"));

    let r = UnmaskRequest {
        dropped: vec![],
        survivors: neighbours[..4].to_vec(),
    };
    let err = p.unmask(&r).unwrap_err().to_string();
    assert!(err.contains("below the threshold 5"), "{err}");

    // Nothing was revealed by the refusals, so the honest request still works.
    assert!(p.unmask(&good).is_ok());
}

// (f) A tampered sealed share, or one from another attempt, is refused.
#[test]
fn tampered_or_replayed_sealed_shares_are_refused() {
    let ctx0 = ctx();
    let ctx1 = RoundContext::new("sim-training", 7, 1).unwrap();
    let key_bytes = |i: u32| {
        RoundKeys::from_secret_bytes([i as u8 + 1; 32], [i as u8 + 101; 32], [i as u8 + 201; 32])
    };
    let make = |ctx: &RoundContext| -> Vec<Participant> {
        (0..5)
            .map(|i| Participant::with_keys(ctx.clone(), i, "org", key_bytes(i)).unwrap())
            .collect()
    };
    let share_all = |ps: &mut Vec<Participant>, ctx: &RoundContext| -> Vec<Vec<SealedSharePair>> {
        let adverts: Vec<Advert> = ps.iter().map(|p| p.advert().clone()).collect();
        let config = RoundConfig::new(ctx.clone(), Graph::complete(5).unwrap(), 3).unwrap();
        ps.iter_mut()
            .map(|p| p.share_keys(config.clone(), &adverts).unwrap())
            .collect()
    };
    let inbox = |outboxes: &[Vec<SealedSharePair>], to: u32| -> Vec<SealedSharePair> {
        outboxes
            .iter()
            .flatten()
            .filter(|s| s.receiver() == to)
            .cloned()
            .collect()
    };
    let mut attempt0 = make(&ctx0);
    let out0 = share_all(&mut attempt0, &ctx0);
    // Keys deliberately reused across attempts, so only the AD/KDF binding stops the replay.
    let mut attempt1 = make(&ctx1);
    let _out1 = share_all(&mut attempt1, &ctx1);

    // Tampered: one bit of the pair 2 → 0.
    let mut tampered = inbox(&out0, 0);
    let pos = tampered.iter().position(|s| s.sender() == 2).unwrap();
    let mut bytes = tampered[pos].to_bytes();
    bytes[40] ^= 0x20;
    tampered[pos] = SealedSharePair::from_bytes(&ctx0, &bytes).unwrap();
    let err = attempt0[0]
        .receive_shares(&tampered)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shares participant 2 sealed for participant 0 fail authentication"),
        "{err}"
    );
    assert!(err.contains("attempt 0"), "{err}");

    // Replayed from attempt 0 into attempt 1.
    let err = attempt1[0]
        .receive_shares(&inbox(&out0, 0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("fail authentication"), "{err}");
    assert!(err.contains("attempt 1"), "{err}");

    // The genuine inbox is still accepted afterwards.
    attempt0[0].receive_shares(&inbox(&out0, 0)).unwrap();
}

// (g) A participant returning a wrong share: the check names who.
#[test]
fn wrong_share_is_caught_and_named() {
    // Exactly t answers, one of them wrong: refused, naming the owner.
    let mut script = Script::new();
    script.silent.insert(4);
    let mut round = start(5, None, &script);
    round.send_inputs(&script);
    let err = round.unmask_with(&script, |r| {
        if r.participant == 3 {
            let (_, share) = &mut r.self_mask_shares[0];
            let mut bytes = *share.as_bytes();
            bytes[9] ^= 0x44;
            *share = sangsaeng_common::privacy::secagg::shamir::Share::from_bytes(&bytes).unwrap();
        }
    });
    let err = error_text(err);
    // Participant 3's first b share is of participant 0; with 4 silent, 0 has
    // exactly t = 3 answering neighbours.
    assert!(err.contains("participant 0's self-mask seed"), "{err}");
    assert!(
        err.contains("does not match the self-mask commitment"),
        "{err}"
    );

    // With a spare share, the wrong one is found, its holder named, and the
    // round still completes.
    let script = Script::new();
    let mut round = start(5, None, &script);
    round.send_inputs(&script);
    let sum = round
        .unmask_with(&script, |r| {
            if r.participant == 3 {
                let (_, share) = &mut r.self_mask_shares[1];
                let mut bytes = *share.as_bytes();
                bytes[30] ^= 0x01;
                *share =
                    sangsaeng_common::privacy::secagg::shamir::Share::from_bytes(&bytes).unwrap();
            }
        })
        .unwrap();
    assert_eq!(sum, round.plain_sum(&round.everyone()));
    let faulty = round.coordinator.suspect_shares();
    assert_eq!(faulty.len(), 1);
    assert_eq!((faulty[0].owner, faulty[0].holder), (1, 3));
}

#[test]
fn wrong_mask_key_share_is_caught() {
    fn flip(r: &mut sangsaeng_common::privacy::secagg::UnmaskResponse) {
        let (_, share) = &mut r.mask_key_shares[0];
        let mut bytes = *share.as_bytes();
        // A different byte per liar: identical errors can cancel in some
        // subset (then the secret is still recovered correctly).
        bytes[1 + r.participant as usize] ^= 0xff;
        *share = sangsaeng_common::privacy::secagg::shamir::Share::from_bytes(&bytes).unwrap();
    }
    // Participant 4 drops; its s_sk has 4 holders, t = 3. One wrong share is
    // found and left out.
    let mut script = Script::new();
    script.drop_before_input.insert(4);
    let mut round = start(5, None, &script);
    round.send_inputs(&script);
    let sum = round
        .unmask_with(&script, |r| {
            if r.participant == 1 {
                flip(r)
            }
        })
        .unwrap();
    assert_eq!(sum, round.plain_sum(&[0, 1, 2, 3].into()));
    let faulty = round.coordinator.suspect_shares();
    assert_eq!((faulty[0].owner, faulty[0].holder), (4, 1));

    // Two wrong shares (at different bytes): refused, naming participant 4.
    let mut round = start(5, None, &script);
    round.send_inputs(&script);
    let err = round.unmask_with(&script, |r| {
        if r.participant == 1 || r.participant == 2 {
            flip(r)
        }
    });
    let err = error_text(err);
    assert!(err.contains("participant 4's mask-agreement key"), "{err}");
    assert!(err.contains("public key in its signed advert"), "{err}");
}

// (h) Each masked vector hides its input in essentially every coordinate.
#[test]
fn masked_vectors_differ_from_inputs_almost_everywhere() {
    for (n, k) in [(5, None), (40, Some(8))] {
        let script = Script::new();
        let mut round = start(n, k, &script);
        round.send_inputs(&script);
        for (i, y) in &round.masked {
            let x = &round.inputs[*i as usize];
            let same = x.iter().zip(y).filter(|(a, b)| a == b).count();
            let differ = PARAMS - same;
            assert!(
                differ * 1000 >= PARAMS * 999,
                "participant {i}: only {differ} of {PARAMS} coordinates masked"
            );
            // And the masked values are not confined to the inputs' range.
            let large = y
                .iter()
                .filter(|v| v.unsigned_abs() > (INPUT_BOUND as u64) << 4)
                .count();
            assert!(large * 10 > PARAMS * 9, "participant {i}: masks look small");
        }
    }
}

// Seekability: masking and unmasking at any chunk boundaries, in any order.
#[test]
fn chunk_boundaries_do_not_matter() {
    let mut results = Vec::new();
    for (mask_chunk, unmask_chunk) in [(PARAMS, PARAMS), (1, 4099), (4096, 333), (3, 7)] {
        let mut script = Script::new();
        script.mask_chunk = mask_chunk;
        script.unmask_chunk = unmask_chunk;
        script.drop_before_input.insert(1);
        let mut round = start(5, None, &script);
        round.send_inputs(&script);
        let sum = round.unmask(&script).unwrap();
        let survivors: BTreeSet<u32> = [0, 2, 3, 4].into();
        assert_eq!(sum, round.plain_sum(&survivors));
        results.push(sum);
    }

    // One participant's masked vector is identical whatever the chunking and order.
    let script = Script::new();
    let round = start(5, None, &script);
    let p = &round.participants[2];
    let x = &round.inputs[2];
    let mut whole = x.clone();
    p.mask_chunk(&mut whole, 0).unwrap();
    let mut pieces = x.clone();
    let bounds = [0, 1, 2, 513, 514, 4095, 4097, 9000, PARAMS];
    for w in bounds.windows(2).rev() {
        p.mask_chunk(&mut pieces[w[0]..w[1]], w[0] as u64).unwrap();
    }
    assert_eq!(whole, pieces);
}

#[test]
fn malformed_outbox_excludes_its_sender_only() {
    let ctx = ctx();
    let mut participants: Vec<Participant> = (0..5)
        .map(|i| Participant::new(ctx.clone(), i, "org").unwrap())
        .collect();
    let adverts: Vec<Advert> = participants.iter().map(|p| p.advert().clone()).collect();
    let config = RoundConfig::new(ctx, Graph::complete(5).unwrap(), 3).unwrap();
    let mut coordinator = Coordinator::new(config.clone(), adverts.clone()).unwrap();
    let mut outboxes: Vec<(u32, Vec<SealedSharePair>)> = participants
        .iter_mut()
        .map(|p| (p.index(), p.share_keys(config.clone(), &adverts).unwrap()))
        .collect();
    outboxes[3].1.pop();
    let routing = coordinator.route_shares(outboxes).unwrap();
    assert_eq!(routing.excluded.len(), 1);
    assert_eq!(routing.excluded[0].0, 3);
    assert!(!routing.inboxes.contains_key(&3));
    assert!(routing.inboxes[&0].iter().all(|s| s.sender() != 3));
    for (i, inbox) in &routing.inboxes {
        participants[*i as usize].receive_shares(inbox).unwrap();
    }
    assert_eq!(participants[0].mask_partners(), vec![1, 2, 4]);
}
