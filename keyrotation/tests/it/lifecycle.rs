//! The key life cycle over simulated months, with an injected clock.

use keyrotation::{
    ACTIVATION_BACKDATE, Clock, KeyAlgorithm, KeyError, KeyRecord, KeyRing, KeyState, Keys, Kid,
    ManualClock, Policy, Suspects, Transition, TransitionReason,
};
use time::OffsetDateTime;

use crate::common::{DAY, HOUR, all_algorithms, claims, header_of, jwks_kids, params, t0};

/// Plans `ring` at the clock's instant and loads the result into `keys`, as a writing
/// instance does on every reload.
fn replan(ring: &mut KeyRing, keys: &Keys, clock: &ManualClock, log: &mut Vec<Transition>) {
    let plan = keyrotation::plan(ring, &Policy::default(), clock.now()).unwrap();
    if !plan.is_empty() {
        *ring = plan.ring;
        log.extend(plan.transitions);
    }
    keys.publish(ring.clone(), None, clock.now()).unwrap();
}

fn kid_of(token: &str) -> Kid {
    Kid::parse(header_of(token)["kid"].as_str().unwrap()).unwrap()
}

#[test]
fn keys_rotate_every_period_with_the_next_key_prepublished_over_five_months() {
    let clock = ManualClock::new(t0());
    let keys = Keys::empty();
    let mut ring = KeyRing::empty();
    let mut log = Vec::new();
    let verify = params(&[KeyAlgorithm::ES256]);

    // The first reload creates the first key, signing at once.
    replan(&mut ring, &keys, &clock, &mut log);
    let first = ring.keys[0].kid.clone();
    assert_eq!(ring.keys.len(), 1);
    assert_eq!(log[0].reason, TransitionReason::Initial);
    assert_eq!(ring.keys[0].activate_at, t0() - ACTIVATION_BACKDATE);
    assert_eq!(
        ring.keys[0].retire_at,
        t0() - ACTIVATION_BACKDATE + DAY * 30
    );
    let early_token = keys.sign(&claims(clock.now(), HOUR), clock.now()).unwrap();
    assert_eq!(kid_of(&early_token), first);

    // Hourly reloads for 150 days.
    let mut signing_kids = vec![first.clone()];
    let mut token_from_first_key_late = None;
    for _ in 0..(150 * 24) {
        clock.advance(HOUR);
        replan(&mut ring, &keys, &clock, &mut log);
        let now = clock.now();
        let signer = ring
            .signing_key_at(now)
            .expect("a key signs at every instant");
        if signing_kids.last() != Some(&signer.kid) {
            signing_kids.push(signer.kid.clone());
        }
        // Exactly one key signs, at most one waits, and JWKS holds every published key.
        let states: Vec<KeyState> = ring.keys.iter().map(|k| k.state_at(now)).collect();
        assert_eq!(states.iter().filter(|s| **s == KeyState::Active).count(), 1);
        assert!(states.iter().filter(|s| **s == KeyState::Next).count() <= 1);
        let published: Vec<String> = ring
            .keys
            .iter()
            .filter(|k| k.is_published_at(now))
            .map(|k| k.kid.to_string())
            .collect();
        assert_eq!(jwks_kids(&keys, now), published);
        if signer.kid == first && now + HOUR >= signer.retire_at {
            token_from_first_key_late = Some((keys.sign(&claims(now, HOUR), now).unwrap(), now));
        }
    }

    // Handovers every 30 days (one minute early: the first key was backdated), so in 150
    // days the first key and five successors signed, in turn.
    assert_eq!(signing_kids.len(), 6, "{signing_kids:?}");

    // Each key went through every state, at its planned instants, exactly once.
    for kid in &signing_kids[..3] {
        let steps: Vec<(Option<KeyState>, Option<KeyState>)> = log
            .iter()
            .filter(|t| &t.kid == kid)
            .map(|t| (t.from, t.to))
            .collect();
        assert_eq!(
            steps,
            vec![
                (None, Some(KeyState::Next)),
                (Some(KeyState::Next), Some(KeyState::Active)),
                (Some(KeyState::Active), Some(KeyState::Retiring)),
                (Some(KeyState::Retiring), Some(KeyState::Retired)),
                (Some(KeyState::Retired), None),
            ],
            "{kid}"
        );
    }
    // The second key was published 7 days before it signed, when the first one retired.
    let second: Vec<&Transition> = log.iter().filter(|t| t.kid == signing_kids[1]).collect();
    let first_retire = log
        .iter()
        .find(|t| t.kid == first && t.to == Some(KeyState::Retiring))
        .unwrap()
        .at;
    assert_eq!(second[1].at, first_retire, "handover at one instant");
    let lead = second[1].at - second[0].at;
    assert!(
        lead <= DAY * 7 && lead > DAY * 7 - HOUR,
        "published {lead} ahead"
    );

    // A token the first key signed just before it retired...
    let (token, signed_at) = token_from_first_key_late.unwrap();
    assert_eq!(kid_of(&token), first);
    // ...but the first key is long gone now: it never verifies again.
    let err = keys
        .verify::<serde_json::Value>(&token, &verify, signed_at + HOUR)
        .unwrap_err();
    assert!(matches!(err, KeyError::UnknownKid), "{err}");
    assert!(ring.key(&first).is_none(), "dropped after the retention");
}

#[test]
fn a_token_signed_just_before_rotation_verifies_until_it_expires() {
    let policy = Policy::default();
    let clock = ManualClock::new(t0());
    let mut ring = keyrotation::plan(&KeyRing::empty(), &policy, clock.now())
        .unwrap()
        .ring;
    let old = ring.keys[0].clone();
    // Reload at the pre-publication instant, then just before the handover.
    clock.set(old.retire_at - DAY * 7);
    ring = keyrotation::plan(&ring, &policy, clock.now()).unwrap().ring;
    clock.set(old.retire_at - time::Duration::seconds(1));
    let keys = Keys::from_ring(ring.clone(), None, clock.now()).unwrap();
    let token = keys.sign(&claims(clock.now(), HOUR), clock.now()).unwrap();
    assert_eq!(kid_of(&token), old.kid);

    // After the handover, with no further write, every instance signs with the new key and
    // still accepts the old key's token for its whole lifetime.
    clock.set(old.retire_at);
    let new_token = keys.sign(&claims(clock.now(), HOUR), clock.now()).unwrap();
    assert_ne!(kid_of(&new_token), old.kid);
    let p = params(&[KeyAlgorithm::ES256]);
    for offset in [0, 30, 59] {
        let at = old.retire_at + time::Duration::minutes(offset);
        keys.verify::<serde_json::Value>(&token, &p, at).unwrap();
    }
    let expired = keys.verify::<serde_json::Value>(&token, &p, old.retire_at + HOUR * 2);
    assert!(matches!(expired, Err(KeyError::Expired)));
}

#[test]
fn a_read_only_instance_switches_key_at_the_planned_instant_without_writing() {
    let policy = Policy::default();
    let start = t0();
    let ring = keyrotation::plan(&KeyRing::empty(), &policy, start)
        .unwrap()
        .ring;
    let ring = keyrotation::plan(&ring, &policy, ring.keys[0].retire_at - DAY)
        .unwrap()
        .ring;
    let (current, next) = (ring.keys[0].clone(), ring.keys[1].clone());
    assert_eq!(next.activate_at, current.retire_at);

    // Loaded once, never reloaded.
    let keys = Keys::from_ring(ring, Some(7), start).unwrap();
    let before = next.activate_at - time::Duration::milliseconds(1);
    assert_eq!(
        kid_of(&keys.sign(&claims(before, HOUR), before).unwrap()),
        current.kid
    );
    assert!(jwks_kids(&keys, before).contains(&next.kid.to_string()));
    let at = next.activate_at;
    assert_eq!(kid_of(&keys.sign(&claims(at, HOUR), at).unwrap()), next.kid);
    let status = keys.status(at);
    assert_eq!(status.active_kid.as_ref(), Some(&next.kid));
    assert_eq!(status.active_key_age_seconds, Some(0));
    assert_eq!(status.next_rotation_at, Some(next.retire_at));
    assert_eq!(status.ring_version, Some(7));
}

#[test]
fn signing_stops_when_the_active_window_ends_without_a_successor() {
    // The ring was planned once, then the key source became unreachable for good.
    let policy = Policy::default();
    let ring = keyrotation::plan(&KeyRing::empty(), &policy, t0())
        .unwrap()
        .ring;
    let key = ring.keys[0].clone();
    let keys = Keys::from_ring(ring, None, t0()).unwrap();

    let last = key.retire_at - time::Duration::seconds(1);
    assert!(keys.sign(&claims(last, HOUR), last).is_ok());
    assert!(keys.can_sign(last));
    let overdue = key.retire_at;
    assert!(matches!(
        keys.sign(&claims(overdue, HOUR), overdue),
        Err(KeyError::NoActiveKey)
    ));
    assert!(!keys.can_sign(overdue));
    // It still verifies what it signed, until its expiry.
    assert_eq!(jwks_kids(&keys, overdue), vec![key.kid.to_string()]);
    assert!(jwks_kids(&keys, key.expire_at).is_empty());

    // When the source is back, the next plan activates a key at once.
    let now = key.retire_at + DAY * 3;
    let plan = keyrotation::plan(&keys.ring(), &policy, now).unwrap();
    assert!(
        plan.transitions
            .iter()
            .any(|t| t.reason == TransitionReason::Overdue && t.to == Some(KeyState::Active))
    );
    let fresh = plan.ring.signing_key_at(now).unwrap();
    assert_eq!(fresh.activate_at, now - ACTIVATION_BACKDATE);
}

/// The ring was not planned during the lead (the rotation job did not run for a week): the
/// successor planned moments before the active key retires is published at once but signs
/// only after the propagation delay, and the active key signs until then, so that no
/// instance is handed a token whose key it may not hold, and no instant has no signer.
#[test]
fn a_successor_planned_late_signs_only_after_the_delay_and_the_active_key_signs_until_then() {
    // an overlap as short as the tokens' lifetime allows: a token the old key signs last
    // verifies to its end only if the key's end moved with its signing window
    let overlap = HOUR + time::Duration::seconds(30);
    let policy = Policy {
        overlap: std::time::Duration::try_from(overlap).unwrap(),
        ..Policy::default()
    };
    let delay = time::Duration::try_from(policy.propagation_delay).unwrap();
    let ring = keyrotation::plan(&KeyRing::empty(), &policy, t0())
        .unwrap()
        .ring;
    let old = ring.keys[0].clone();
    let now = old.retire_at - time::Duration::seconds(10);
    let plan = keyrotation::plan(&ring, &policy, now).unwrap();
    assert!(!plan.is_empty());
    let fresh = plan.ring.keys.iter().find(|k| k.kid != old.kid).unwrap();
    assert_eq!(fresh.publish_at, now, "published at once");
    assert_eq!(fresh.activate_at, now + delay, "signs after the delay");
    assert_eq!(fresh.retire_at, now + delay + DAY * 30, "for a full period");
    let kept = plan.ring.key(&old.kid).unwrap();
    assert_eq!(
        kept.retire_at, fresh.activate_at,
        "the active key signs until then"
    );
    assert_eq!(
        kept.expire_at,
        fresh.activate_at + overlap,
        "then verifies for the overlap"
    );
    let second = time::Duration::SECOND;
    for at in [now, old.retire_at, fresh.activate_at - second] {
        assert_eq!(
            plan.ring.signing_key_at(at).unwrap().kid,
            old.kid,
            "at {at}"
        );
    }
    assert_eq!(
        plan.ring.signing_key_at(fresh.activate_at).unwrap().kid,
        fresh.kid
    );
    // A token the old key signed last verifies for its whole lifetime.
    let keys = Keys::from_ring(plan.ring.clone(), Some(2), now).unwrap();
    let last = fresh.activate_at - second;
    let token = keys.sign(&claims(last, HOUR), last).unwrap();
    assert_eq!(kid_of(&token), old.kid);
    let end = last + HOUR;
    assert!(
        keys.verify::<serde_json::Value>(&token, &params(&all_algorithms()), end)
            .is_ok()
    );
    // Planned again meanwhile, nothing more changes.
    assert!(
        keyrotation::plan(&plan.ring, &policy, now + second)
            .unwrap()
            .is_empty()
    );
    // Planned in time, the successor signs at the planned instant, as before.
    let early = old.retire_at - DAY;
    let timely = keyrotation::plan(&ring, &policy, early).unwrap();
    let next = timely.ring.keys.iter().find(|k| k.kid != old.kid).unwrap();
    assert_eq!(next.activate_at, old.retire_at);
    assert_eq!(timely.ring.key(&old.kid).unwrap().retire_at, old.retire_at);
}

#[test]
fn rotate_now_activates_the_next_key_and_keeps_the_old_one_for_the_overlap() {
    let policy = Policy::default();
    let ring = keyrotation::plan(&KeyRing::empty(), &policy, t0())
        .unwrap()
        .ring;
    let old = ring.keys[0].clone();
    // The next key is already published.
    let ring = keyrotation::plan(&ring, &policy, old.retire_at - DAY * 5)
        .unwrap()
        .ring;
    let pending = ring.keys[1].clone();

    let now = old.retire_at - DAY * 4;
    let keys = Keys::from_ring(ring.clone(), None, now).unwrap();
    let old_token = keys.sign(&claims(now, HOUR), now).unwrap();
    let plan = keyrotation::rotate_now(&ring, &policy, now).unwrap();
    let keys = Keys::from_ring(plan.ring.clone(), None, now).unwrap();

    assert_eq!(
        plan.transitions
            .iter()
            .map(|t| (t.kid.clone(), t.from, t.to, t.at, t.reason.clone()))
            .collect::<Vec<_>>(),
        vec![
            (
                old.kid.clone(),
                Some(KeyState::Active),
                Some(KeyState::Retiring),
                now,
                TransitionReason::RotateNow
            ),
            (
                pending.kid.clone(),
                Some(KeyState::Next),
                Some(KeyState::Active),
                now,
                TransitionReason::RotateNow
            ),
        ]
    );
    assert_eq!(
        kid_of(&keys.sign(&claims(now, HOUR), now).unwrap()),
        pending.kid
    );
    let rotated_old = plan.ring.key(&old.kid).unwrap();
    assert_eq!(rotated_old.expire_at, now + DAY * 30, "normal overlap");
    keys.verify::<serde_json::Value>(&old_token, &params(&[KeyAlgorithm::ES256]), now + HOUR)
        .unwrap();
    let new_key = plan.ring.key(&pending.kid).unwrap();
    assert_eq!(new_key.retire_at, now + DAY * 30, "a full period from now");
}

/// With no next key pending, a rotation brought forward generates one: published at once,
/// signing only after the propagation delay (every instance has reloaded the ring by
/// then), while the current key signs until that instant and verifies for the overlap
/// after it.
#[test]
fn rotate_now_without_a_pending_key_publishes_a_fresh_one_that_signs_after_the_delay() {
    let policy = Policy::default();
    let ring = keyrotation::plan(&KeyRing::empty(), &policy, t0())
        .unwrap()
        .ring;
    let old = ring.keys[0].clone();
    let now = t0() + DAY;
    let plan = keyrotation::rotate_now(&ring, &policy, now).unwrap();
    assert_eq!(plan.ring.keys.len(), 2);
    let fresh = plan.ring.keys.iter().find(|k| k.kid != old.kid).unwrap();
    let activation = fresh.activate_at;
    let delay = time::Duration::try_from(policy.propagation_delay).unwrap();
    assert_eq!(
        activation,
        now + delay,
        "signs only after the propagation delay"
    );
    assert_eq!(fresh.publish_at, now, "published at once");
    assert_eq!(fresh.state_at(now), KeyState::Next);
    assert!(fresh.is_published_at(now));
    assert_eq!(fresh.retire_at, activation + DAY * 30, "a full period");
    let rotated = plan.ring.key(&old.kid).unwrap();
    assert_eq!(rotated.retire_at, activation);
    assert_eq!(rotated.expire_at, activation + DAY * 30, "normal overlap");
    assert_eq!(plan.ring.signing_key_at(now).unwrap().kid, old.kid);
    let second = time::Duration::SECOND;
    assert_eq!(
        plan.ring.signing_key_at(activation - second).unwrap().kid,
        old.kid
    );
    assert_eq!(plan.ring.signing_key_at(activation).unwrap().kid, fresh.kid);
    assert_eq!(
        rotated.state_at(activation),
        KeyState::Retiring,
        "old key still verifies"
    );
    assert_eq!(
        plan.transitions
            .iter()
            .map(|t| (t.kid.clone(), t.from, t.to, t.at, t.reason.clone()))
            .collect::<Vec<_>>(),
        vec![(
            fresh.kid.clone(),
            None,
            Some(KeyState::Next),
            now,
            TransitionReason::RotateNow
        )],
        "only the publication has happened"
    );
}

/// A next key planned moments ago is not known everywhere yet either: brought forward, it
/// signs once it has been in the ring for the propagation delay. Asked again meanwhile
/// (a second operator, another instance), nothing more changes.
#[test]
fn rotate_now_lets_a_just_planned_next_key_sign_after_the_delay_and_only_once() {
    let policy = Policy::default();
    let delay = time::Duration::try_from(policy.propagation_delay).unwrap();
    let first = keyrotation::plan(&KeyRing::empty(), &policy, t0())
        .unwrap()
        .ring;
    let old = first.keys[0].clone();
    // the next key is planned the moment the lead begins
    let planned_at = old.retire_at - DAY * 7;
    let ring = keyrotation::plan(&first, &policy, planned_at).unwrap().ring;
    let pending = ring.keys[1].clone();
    assert_eq!(pending.created_at, planned_at);

    let now = planned_at + time::Duration::SECOND * 10;
    let plan = keyrotation::rotate_now(&ring, &policy, now).unwrap();
    assert!(!plan.is_empty(), "rescheduled instants are written");
    assert!(plan.transitions.is_empty(), "{:?}", plan.transitions);
    let next = plan.ring.key(&pending.kid).unwrap();
    assert_eq!(next.activate_at, planned_at + delay);
    assert_eq!(
        plan.ring.key(&old.kid).unwrap().retire_at,
        planned_at + delay
    );
    assert_eq!(plan.ring.signing_key_at(now).unwrap().kid, old.kid);

    let again = keyrotation::rotate_now(&plan.ring, &policy, now + time::Duration::SECOND);
    let again = again.unwrap();
    assert!(again.is_empty(), "{:?}", again.transitions);
    assert_eq!(again.ring, plan.ring);
}

/// A first key two days before its retirement, with its successor published: the ring,
/// the active key and the pending one.
fn ring_with_a_pending_key(policy: &Policy) -> (KeyRing, KeyRecord, KeyRecord) {
    let first = keyrotation::plan(&KeyRing::empty(), policy, t0())
        .unwrap()
        .ring;
    let active = first.keys[0].clone();
    let ring = keyrotation::plan(&first, policy, active.retire_at - DAY * 2)
        .unwrap()
        .ring;
    let pending = ring.keys[1].clone();
    assert_eq!(pending.state_at(active.retire_at - DAY * 2), KeyState::Next);
    (ring, active, pending)
}

#[test]
fn emergency_rotation_retires_the_compromised_key_at_once() {
    let policy = Policy::default();
    let (ring, victim, pending) = ring_with_a_pending_key(&policy);
    let now = victim.retire_at - DAY;
    let keys = Keys::from_ring(ring.clone(), None, now).unwrap();
    let stolen = keys.sign(&claims(now, HOUR), now).unwrap();

    let plan = keyrotation::emergency_rotate(
        &ring,
        &policy,
        now,
        "key leaked in a backup",
        &Suspects::EveryVerifyingKey,
    )
    .unwrap();
    // the handle that held the victim stops trusting it once the new ring is published
    let generation = keys.generation();
    assert!(keys.trusts(&victim.kid.to_string(), now));
    assert!(keys.publish(plan.ring.clone(), None, now).unwrap());
    assert!(keys.generation() > generation);
    assert!(!keys.trusts(&victim.kid.to_string(), now));
    let keys = Keys::from_ring(plan.ring.clone(), None, now).unwrap();

    // The compromised key no longer verifies, nor appears in JWKS.
    let err = keys
        .verify::<serde_json::Value>(&stolen, &params(&[KeyAlgorithm::ES256]), now)
        .unwrap_err();
    assert!(matches!(err, KeyError::UnknownKid), "{err}");
    let kids = jwks_kids(&keys, now);
    assert!(!kids.contains(&victim.kid.to_string()));
    // The pending key, stored with it, was discarded; a fresh key signs immediately.
    assert!(!kids.contains(&pending.kid.to_string()));
    assert!(plan.ring.key(&pending.kid).is_none());
    let fresh = kid_of(&keys.sign(&claims(now, HOUR), now).unwrap());
    assert!(fresh != victim.kid && fresh != pending.kid);
    assert_eq!(kids, vec![fresh.to_string()]);

    let reason = TransitionReason::Compromised {
        note: "key leaked in a backup".to_owned(),
    };
    let summary: Vec<_> = plan
        .transitions
        .iter()
        .map(|t| (t.kid.clone(), t.from, t.to, t.reason.clone()))
        .collect();
    assert!(summary.contains(&(
        victim.kid.clone(),
        Some(KeyState::Active),
        Some(KeyState::Retired),
        reason.clone()
    )));
    assert!(summary.contains(&(
        pending.kid.clone(),
        Some(KeyState::Next),
        None,
        reason.clone()
    )));
    assert!(summary.contains(&(
        fresh.clone(),
        Some(KeyState::Next),
        Some(KeyState::Active),
        reason
    )));

    let status = keys.status(now);
    let victim_status = status.keys.iter().find(|k| k.kid == victim.kid).unwrap();
    assert_eq!(victim_status.state, KeyState::Retired);
    assert_eq!(victim_status.compromised_at, Some(now));
    assert_eq!(
        victim_status.compromise_reason.as_deref(),
        Some("key leaked in a backup")
    );
    assert!(!victim_status.published);
}

/// A ring a day after a scheduled rotation: `old` retiring (verifying for the overlap),
/// `current` active, and a token each signed.
fn ring_with_a_retiring_key() -> (
    KeyRing,
    KeyRecord,
    KeyRecord,
    OffsetDateTime,
    String,
    String,
) {
    let policy = Policy::default();
    let first = keyrotation::plan(&KeyRing::empty(), &policy, t0())
        .unwrap()
        .ring;
    let old = first.keys[0].clone();
    let signed_old_at = old.retire_at - DAY * 2;
    let ring = keyrotation::plan(&first, &policy, signed_old_at)
        .unwrap()
        .ring;
    let old_token = Keys::from_ring(ring.clone(), None, signed_old_at)
        .unwrap()
        .sign(&claims(signed_old_at, DAY * 3), signed_old_at)
        .unwrap();
    let now = old.retire_at + DAY;
    let ring = keyrotation::plan(&ring, &policy, now).unwrap().ring;
    let current = ring.signing_key_at(now).unwrap().clone();
    assert_ne!(current.kid, old.kid);
    assert_eq!(
        ring.key(&old.kid).unwrap().state_at(now),
        KeyState::Retiring
    );
    let current_token = Keys::from_ring(ring.clone(), None, now)
        .unwrap()
        .sign(&claims(now, HOUR), now)
        .unwrap();
    (ring, old, current, now, old_token, current_token)
}

#[test]
fn an_emergency_retires_the_retiring_key_too_since_it_was_stored_with_the_active_one() {
    let (ring, old, current, now, old_token, current_token) = ring_with_a_retiring_key();
    let p = params(&[KeyAlgorithm::ES256]);
    let before = Keys::from_ring(ring.clone(), None, now).unwrap();
    before
        .verify::<serde_json::Value>(&old_token, &p, now)
        .unwrap();

    let plan = keyrotation::emergency_rotate(
        &ring,
        &Policy::default(),
        now,
        "ring read with a leaked token",
        &Suspects::EveryVerifyingKey,
    )
    .unwrap();
    let keys = Keys::from_ring(plan.ring.clone(), None, now).unwrap();
    for token in [&old_token, &current_token] {
        let err = keys
            .verify::<serde_json::Value>(token, &p, now)
            .unwrap_err();
        assert!(matches!(err, KeyError::UnknownKid), "{err}");
    }
    let fresh = kid_of(&keys.sign(&claims(now, HOUR), now).unwrap());
    assert_eq!(jwks_kids(&keys, now), vec![fresh.to_string()]);
    for victim in [&old.kid, &current.kid] {
        assert!(plan.ring.key(victim).unwrap().compromised.is_some());
        assert!(plan.transitions.iter().any(|t| &t.kid == victim
            && t.to == Some(KeyState::Retired)
            && matches!(t.reason, TransitionReason::Compromised { .. })));
    }
}

#[test]
fn an_emergency_naming_the_retiring_key_leaves_the_active_key_signing() {
    let (ring, old, current, now, old_token, current_token) = ring_with_a_retiring_key();
    let p = params(&[KeyAlgorithm::ES256]);
    let named = Suspects::Keys(vec![old.kid.clone()]);
    let plan = keyrotation::emergency_rotate(&ring, &Policy::default(), now, "old backup", &named)
        .unwrap();
    let keys = Keys::from_ring(plan.ring.clone(), None, now).unwrap();
    assert!(matches!(
        keys.verify::<serde_json::Value>(&old_token, &p, now),
        Err(KeyError::UnknownKid)
    ));
    keys.verify::<serde_json::Value>(&current_token, &p, now)
        .unwrap();
    assert_eq!(
        kid_of(&keys.sign(&claims(now, HOUR), now).unwrap()),
        current.kid
    );
    assert_eq!(jwks_kids(&keys, now), vec![current.kid.to_string()]);
    assert_eq!(plan.transitions.len(), 1, "{:?}", plan.transitions);

    // Named again (a second operator, a retry): nothing more to write.
    let again =
        keyrotation::emergency_rotate(&plan.ring, &Policy::default(), now, "old backup", &named)
            .unwrap();
    assert!(again.is_empty(), "{:?}", again.transitions);
    assert_eq!(again.ring, plan.ring);
}

#[test]
fn an_emergency_naming_an_unknown_key_changes_nothing() {
    let (ring, _, _, now, _, _) = ring_with_a_retiring_key();
    let named = Suspects::Keys(vec![Kid::parse("no-such-key").unwrap()]);
    let err =
        keyrotation::emergency_rotate(&ring, &Policy::default(), now, "typo", &named).unwrap_err();
    assert!(
        matches!(&err, KeyError::NotInRing(kid) if kid == "no-such-key"),
        "{err}"
    );
}

/// The same emergency run again (an operator retrying after a failure whose outcome was
/// unknown, naming the keys the first attempt acted on): when the first attempt landed,
/// the keys it retired are compromised and the waiting one it discarded is gone, and
/// nothing more changes; the fresh key it made keeps signing. A key the ring lacks is
/// still refused when no named key was retired yet.
#[test]
fn an_emergency_run_again_on_the_keys_it_named_changes_nothing() {
    let policy = Policy::default();
    let (ring, active, pending) = ring_with_a_pending_key(&policy);
    let now = active.retire_at - DAY * 2;
    let named = Suspects::Keys(vec![active.kid.clone(), pending.kid.clone()]);
    let first = keyrotation::emergency_rotate(&ring, &policy, now, "leak", &named).unwrap();
    assert!(
        first.ring.key(&pending.kid).is_none(),
        "the waiting key is discarded"
    );
    assert!(first.ring.key(&active.kid).unwrap().compromised.is_some());
    let fresh = first.ring.signing_key_at(now).unwrap().kid.clone();

    let later = now + time::Duration::minutes(5);
    let again = keyrotation::emergency_rotate(&first.ring, &policy, later, "leak", &named).unwrap();
    assert!(again.is_empty(), "{:?}", again.transitions);
    assert_eq!(again.ring.signing_key_at(later).unwrap().kid, fresh);

    // on a ring where the emergency has not happened, a missing kid is a mistake
    let typo = Suspects::Keys(vec![active.kid.clone(), Kid::parse("no-such-key").unwrap()]);
    let err = keyrotation::emergency_rotate(&ring, &policy, now, "leak", &typo).unwrap_err();
    assert!(
        matches!(&err, KeyError::NotInRing(kid) if kid == "no-such-key"),
        "{err}"
    );
    // and after it, next to a named key it did not retire (another emergency, not this
    // one run again)
    let other = Suspects::Keys(vec![
        active.kid.clone(),
        fresh.clone(),
        Kid::parse("no-such-key").unwrap(),
    ]);
    let err =
        keyrotation::emergency_rotate(&first.ring, &policy, later, "leak", &other).unwrap_err();
    assert!(
        matches!(&err, KeyError::NotInRing(kid) if kid == "no-such-key"),
        "{err}"
    );
}

#[test]
fn an_emergency_naming_the_pending_key_discards_it_and_the_schedule_replaces_it() {
    let policy = Policy::default();
    let (ring, active, pending) = ring_with_a_pending_key(&policy);
    let now = active.retire_at - DAY * 2;
    let plan = keyrotation::emergency_rotate(
        &ring,
        &policy,
        now,
        "exported by mistake",
        &Suspects::Keys(vec![pending.kid.clone()]),
    )
    .unwrap();
    assert!(plan.ring.key(&pending.kid).is_none());
    assert_eq!(plan.ring.signing_key_at(now).unwrap().kid, active.kid);
    // within the lead of the active key's retirement: a new next key was generated
    let successor = plan
        .ring
        .keys
        .iter()
        .find(|k| k.state_at(now) == KeyState::Next)
        .unwrap();
    assert_ne!(successor.kid, pending.kid);
    assert_eq!(successor.activate_at, active.retire_at);
}

#[test]
fn new_keys_use_the_policy_algorithm() {
    for alg in all_algorithms() {
        let policy = Policy {
            algorithm: alg,
            ..Policy::default()
        };
        let ring = keyrotation::plan(&KeyRing::empty(), &policy, t0())
            .unwrap()
            .ring;
        assert_eq!(ring.keys[0].alg, alg);
        let keys = Keys::from_ring(ring, None, t0()).unwrap();
        let jwk = &keys.jwks(t0())["keys"][0];
        assert_eq!(jwk["alg"], alg.as_str());
    }
}

#[test]
fn planning_twice_at_the_same_instant_writes_nothing_the_second_time() {
    let policy = Policy::default();
    let now = t0() + DAY * 24;
    let ring = keyrotation::plan(&KeyRing::empty(), &policy, t0())
        .unwrap()
        .ring;
    let first = keyrotation::plan(&ring, &policy, now).unwrap();
    assert!(!first.is_empty());
    let second = keyrotation::plan(&first.ring, &policy, now).unwrap();
    assert!(second.is_empty(), "{:?}", second.transitions);
    assert_eq!(second.ring, first.ring);
}
