//! Property tests of the life cycle: random policies and random histories of reloads,
//! early rotations and emergency rotations, each reload at most one lead apart.
//!
//! Invariants:
//! 1. at every instant exactly one key signs;
//! 2. every token signed at `t` with lifetime `L <= max lifetime` verifies on `[t, t+L]`
//!    (unless its key was declared compromised);
//! 3. a retired (or compromised) key never verifies;
//! 4. a key is in JWKS exactly from its publish instant until its expiry, and no write
//!    drops a key that is still published (except what an emergency rotation discards).

use std::collections::HashSet;
use std::time::Duration;

use keyrotation::{KeyAlgorithm, KeyError, KeyRing, Keys, Kid, Plan, Policy, VerifyParams};
use proptest::prelude::*;
use time::OffsetDateTime;

use crate::common::{Claims, claims, header_of, t0};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Plan,
    RotateNow,
    Emergency,
}

#[derive(Debug, Clone)]
struct Scenario {
    period_h: u64,
    lead_h: u64,
    max_lifetime_min: u64,
    leeway_s: u64,
    extra_overlap_h: u64,
    retention_h: u64,
    /// How long a key brought forward waits before it signs.
    propagation_s: u64,
    /// Gap before each step, in thousandths of the lead, and the step.
    steps: Vec<(u64, Op)>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (48u64..=960)
        .prop_flat_map(|period_h| {
            let step = (
                1u64..=1000,
                prop_oneof![
                    12 => Just(Op::Plan),
                    1 => Just(Op::RotateNow),
                    1 => Just(Op::Emergency),
                ],
            );
            (
                Just(period_h),
                1..period_h,
                5u64..=1440,
                0u64..=120,
                0u64..=720,
                0u64..=336,
                0u64..=600,
                proptest::collection::vec(step, 10..60),
            )
        })
        .prop_map(
            |(
                period_h,
                lead_h,
                max_lifetime_min,
                leeway_s,
                extra_overlap_h,
                retention_h,
                propagation_s,
                steps,
            )| {
                Scenario {
                    period_h,
                    lead_h,
                    max_lifetime_min,
                    leeway_s,
                    extra_overlap_h,
                    retention_h,
                    propagation_s,
                    steps,
                }
            },
        )
}

/// The simulated history: each ring is in force from its instant until the next one's.
struct History {
    instants: Vec<OffsetDateTime>,
    rings: Vec<KeyRing>,
    keys: Vec<Keys>,
    ops: Vec<Op>,
}

impl History {
    fn index_at(&self, at: OffsetDateTime) -> usize {
        self.instants
            .partition_point(|t| *t <= at)
            .saturating_sub(1)
    }
}

fn run(s: &Scenario) -> (Policy, Duration, Duration, History) {
    let hours = |h: u64| Duration::from_secs(h * 3600);
    let max_lifetime = Duration::from_secs(s.max_lifetime_min * 60);
    let leeway = Duration::from_secs(s.leeway_s);
    let policy = Policy {
        algorithm: KeyAlgorithm::ES256,
        rotation_period: hours(s.period_h),
        prepublish_lead: hours(s.lead_h),
        overlap: max_lifetime + leeway + hours(s.extra_overlap_h),
        retired_retention: hours(s.retention_h),
        propagation_delay: Duration::from_secs(s.propagation_s),
    };
    policy.validate(max_lifetime, leeway).unwrap();

    let lead = time::Duration::hours(s.lead_h as i64);
    let mut now = t0();
    let mut ring = keyrotation::plan(&KeyRing::empty(), &policy, now)
        .unwrap()
        .ring;
    let mut history = History {
        instants: vec![now],
        rings: vec![ring.clone()],
        keys: vec![Keys::from_ring(ring.clone(), Some(0), now).unwrap()],
        ops: vec![Op::Plan],
    };
    for (i, (gap, op)) in s.steps.iter().enumerate() {
        let gap = (lead * (*gap as f64 / 1000.0)).max(time::Duration::minutes(1));
        now += time::Duration::seconds(gap.whole_seconds());
        let plan: Plan = match op {
            Op::Plan => keyrotation::plan(&ring, &policy, now),
            Op::RotateNow => keyrotation::rotate_now(&ring, &policy, now),
            Op::Emergency => keyrotation::emergency_rotate(
                &ring,
                &policy,
                now,
                "test",
                &keyrotation::Suspects::EveryVerifyingKey,
            ),
        }
        .unwrap();
        ring = plan.ring;
        history.instants.push(now);
        history.rings.push(ring.clone());
        history
            .keys
            .push(Keys::from_ring(ring.clone(), Some(i as u64 + 1), now).unwrap());
        history.ops.push(*op);
    }
    (policy, max_lifetime, leeway, history)
}

/// Instants worth checking inside `[from, to)` for `ring`: the ends, the middle, and a
/// second either side of every planned instant.
fn samples(ring: &KeyRing, from: OffsetDateTime, to: OffsetDateTime) -> Vec<OffsetDateTime> {
    let second = time::Duration::seconds(1);
    let mut out = vec![from, from + (to - from) / 2, to - second];
    for k in &ring.keys {
        for at in [k.publish_at, k.activate_at, k.retire_at, k.expire_at] {
            out.extend([at - second, at, at + second]);
        }
    }
    out.retain(|t| *t >= from && *t < to);
    out.sort();
    out.dedup();
    out
}

fn kid_of(token: &str) -> Kid {
    Kid::parse(header_of(token)["kid"].as_str().unwrap()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn exactly_one_key_signs_and_jwks_follows_the_stored_instants(s in scenario()) {
        let (_, _, _, h) = run(&s);
        for i in 0..h.rings.len() - 1 {
            let (ring, keys) = (&h.rings[i], &h.keys[i]);
            for at in samples(ring, h.instants[i], h.instants[i + 1]) {
                let signers = ring.keys.iter().filter(|k| k.signs_at(at)).count();
                prop_assert_eq!(signers, 1, "ring {} at {}", i, at);
                prop_assert!(keys.sign(&claims(at, time::Duration::minutes(5)), at).is_ok());

                let mut published: Vec<String> = ring
                    .keys
                    .iter()
                    .filter(|k| k.compromised.is_none() && k.publish_at <= at && at < k.expire_at)
                    .map(|k| k.kid.to_string())
                    .collect();
                let mut jwks: Vec<String> = keys.jwks(at)["keys"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k["kid"].as_str().unwrap().to_owned())
                    .collect();
                published.sort();
                jwks.sort();
                prop_assert_eq!(jwks, published, "ring {} at {}", i, at);
            }
        }
    }

    #[test]
    fn no_write_drops_a_key_that_is_still_published(s in scenario()) {
        let (_, _, _, h) = run(&s);
        for i in 1..h.rings.len() {
            let at = h.instants[i];
            let (before, after) = (&h.rings[i - 1], &h.rings[i]);
            let emergency = h.ops[i] == Op::Emergency;
            for key in before.keys.iter().filter(|k| k.is_published_at(at)) {
                match after.key(&key.kid) {
                    Some(k) if k.is_published_at(at) || k.compromised.is_some() => {}
                    None if emergency => {}
                    other => prop_assert!(false, "{} vanished at step {}: {:?}", key.kid, i, other.map(|k| k.state_at(at))),
                }
            }
        }
    }

    #[test]
    fn tokens_verify_for_their_whole_lifetime_and_retired_keys_never_verify(s in scenario()) {
        let (_, max_lifetime, leeway, h) = run(&s);
        let lifetime = time::Duration::try_from(max_lifetime).unwrap();
        let params = VerifyParams {
            leeway,
            ..crate::common::params(&[KeyAlgorithm::ES256])
        };
        let compromised: HashSet<Kid> = h
            .rings
            .iter()
            .flat_map(|r| r.keys.iter().filter(|k| k.compromised.is_some()).map(|k| k.kid.clone()))
            .collect();

        for i in 0..h.rings.len() - 1 {
            let (from, to) = (h.instants[i], h.instants[i + 1]);
            let middle = from + time::Duration::seconds((to - from).whole_seconds() / 2);
            for signed_at in [from, middle] {
                let token = h.keys[i].sign(&claims(signed_at, lifetime), signed_at).unwrap();
                let kid = kid_of(&token);

                // 2. Verifies on [t, t + L] with whichever ring is in force then.
                let mut checks = vec![signed_at, signed_at + lifetime / 2, signed_at + lifetime];
                checks.extend(h.instants.iter().copied().filter(|t| *t > signed_at && *t <= signed_at + lifetime));
                for at in checks {
                    let j = h.index_at(at);
                    let result = h.keys[j].verify::<Claims>(&token, &params, at);
                    let revoked = h.rings[j].key(&kid).is_none_or(|k| k.compromised.is_some());
                    if revoked {
                        prop_assert!(compromised.contains(&kid), "{} missing at {} but never compromised", kid, at);
                        prop_assert!(matches!(result, Err(KeyError::UnknownKid)), "{:?}", result);
                    } else {
                        prop_assert!(result.is_ok(), "token of {} signed {} rejected at {}: {:?}", kid, signed_at, at, result);
                    }
                }

                // 3. Once retired (or compromised, or dropped) the key verifies nothing.
                for j in i..h.rings.len() {
                    let start = h.instants[j];
                    let end = h.instants.get(j + 1).copied().unwrap_or(start + time::Duration::days(400));
                    let mut retired_at = Vec::new();
                    match h.rings[j].key(&kid) {
                        None => retired_at.push(start),
                        Some(k) => {
                            let gone = k.compromised.as_ref().map_or(k.expire_at, |c| c.at);
                            if gone < end {
                                retired_at.push(gone.max(start));
                                retired_at.push(end - time::Duration::seconds(1));
                            }
                        }
                    }
                    for at in retired_at {
                        let result = h.keys[j].verify::<Claims>(&token, &params, at);
                        prop_assert!(matches!(result, Err(KeyError::UnknownKid)), "{} verified at {} after retiring: {:?}", kid, at, result);
                    }
                }
            }
        }
    }
}
