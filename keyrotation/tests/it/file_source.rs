//! The `--dev` file key source, and the Rotator driven over it.

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;

use keyrotation::{
    Clock, FileKeySource, KeyError, KeyRing, KeySource, KeyState, Keys, ManualClock, Policy,
    RotationMode, Rotator, StoreOutcome, Suspects, TransitionReason,
};

use crate::common::{DAY, HOUR, claims, key_source_conformance, t0};

/// A writing rotator over the ring file in `dir`, on `clock`.
fn file_rotator(dir: &std::path::Path, clock: &ManualClock) -> Rotator {
    Rotator::new(
        Arc::new(FileKeySource::new(dir).unwrap()),
        Keys::empty(),
        Policy::default(),
        RotationMode::InProcess,
        Arc::new(clock.clone()),
    )
}

#[tokio::test]
async fn file_source_behaves_like_every_key_source() {
    let dir = tempfile::tempdir().unwrap();
    let source = FileKeySource::new(dir.path().join("keys")).unwrap();
    key_source_conformance(&source).await;
}

#[tokio::test]
async fn ring_file_is_private_and_leaves_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let source = FileKeySource::new(dir.path().join("keys")).unwrap();
    let ring = keyrotation::plan(&KeyRing::empty(), &Policy::default(), t0())
        .unwrap()
        .ring;
    source.store(&ring, None).await.unwrap();
    source.store(&ring, Some(1)).await.unwrap();

    let mode = std::fs::metadata(source.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "ring file mode {mode:o}");
    let dir_mode = std::fs::metadata(dir.path().join("keys"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700, "ring dir mode {dir_mode:o}");
    let names: Vec<String> = std::fs::read_dir(dir.path().join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["keyring.json".to_owned()]);
}

#[tokio::test]
async fn ring_survives_reopening_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyrotation::plan(&KeyRing::empty(), &Policy::default(), t0())
        .unwrap()
        .ring;
    {
        let source = FileKeySource::new(dir.path()).unwrap();
        assert_eq!(
            source.store(&ring, None).await.unwrap(),
            StoreOutcome::Stored(1)
        );
    }
    let reopened = FileKeySource::new(dir.path()).unwrap();
    let loaded = reopened.load().await.unwrap().unwrap();
    assert_eq!((loaded.version, loaded.value), (1, ring.clone()));
    // Check-and-set continues from the stored version.
    assert_eq!(
        reopened.store(&ring, None).await.unwrap(),
        StoreOutcome::Conflict
    );
    assert_eq!(
        reopened.store(&ring, Some(1)).await.unwrap(),
        StoreOutcome::Stored(2)
    );
}

#[tokio::test]
async fn a_corrupt_ring_file_is_reported_without_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let source = FileKeySource::new(dir.path()).unwrap();
    std::fs::write(
        source.path(),
        br#"{"version": 1, "ring": {"format": 1, "keys": "MIGHT-BE-SECRET"}}"#,
    )
    .unwrap();
    let err = source.load().await.unwrap_err();
    assert!(matches!(err, KeyError::CorruptRing(_)), "{err}");
    assert!(!err.to_string().contains("MIGHT-BE-SECRET"), "{err}");
}

#[tokio::test]
async fn racing_rotators_on_one_file_write_each_change_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(t0());
    let rotators: Vec<Rotator> = (0..3).map(|_| file_rotator(dir.path(), &clock)).collect();

    for step in [time::Duration::ZERO, DAY * 23, DAY * 30, DAY * 60, DAY * 67] {
        clock.set(t0() + step);
        let (a, b, c) = tokio::join!(
            rotators[0].reload_once(),
            rotators[1].reload_once(),
            rotators[2].reload_once()
        );
        let outcomes = [a.unwrap(), b.unwrap(), c.unwrap()];
        let writers = outcomes
            .iter()
            .filter(|o| !o.transitions.is_empty())
            .count();
        assert_eq!(writers, 1, "at +{step}: {outcomes:?}");
        let versions: Vec<u64> = rotators
            .iter()
            .map(|r| r.keys().ring_version().unwrap())
            .collect();
        assert!(versions.iter().all(|v| *v == versions[0]), "{versions:?}");
        assert_eq!(rotators[0].keys().ring(), rotators[2].keys().ring());
    }
}

#[tokio::test]
async fn rotator_over_a_file_creates_rotates_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(t0());
    let rotator = file_rotator(dir.path(), &clock);
    let mut audit = rotator.subscribe();

    let first = rotator.reload_once().await.unwrap();
    assert_eq!(first.version, 1);
    assert!(first.keys_changed);
    assert_eq!(first.transitions[0].reason, TransitionReason::Initial);
    assert_eq!(audit.try_recv().unwrap(), first.transitions[0]);
    let old = rotator.keys().status(clock.now()).active_kid.unwrap();

    // Nothing due: no write, same ring.
    clock.advance(HOUR);
    let quiet = rotator.reload_once().await.unwrap();
    assert!(quiet.transitions.is_empty());
    assert!(!quiet.keys_changed);
    assert_eq!(quiet.version, 1);

    let rotated = rotator.rotate(false).await.unwrap();
    assert_eq!(rotated.version, 2);
    let status = rotator.keys().status(clock.now());
    assert_ne!(status.active_kid.as_ref(), Some(&old));
    let old_status = status.keys.iter().find(|k| k.kid == old).unwrap();
    assert_eq!(old_status.state, KeyState::Retiring);

    let emergency = rotator
        .rotate_with_reason(Some("laptop stolen".to_owned()))
        .await
        .unwrap();
    assert!(emergency.transitions.iter().any(|t| matches!(
        &t.reason,
        TransitionReason::Compromised { note } if note == "laptop stolen"
    )));
    let token = rotator
        .keys()
        .sign(&claims(clock.now(), HOUR), clock.now())
        .unwrap();
    assert!(!token.is_empty());

    let health = rotator.health();
    assert_eq!(health.reloads, 2);
    assert_eq!(health.reload_failures, 0);
    assert_eq!(health.last_success_at, Some(t0() + HOUR));
    assert!(health.transitions_written >= 5);
}

#[tokio::test]
async fn a_read_only_rotator_never_writes_and_cannot_create_a_ring() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(t0()));
    let reader = Rotator::new(
        Arc::new(FileKeySource::new(dir.path()).unwrap()),
        Keys::empty(),
        Policy::default(),
        RotationMode::ReadOnly,
        clock.clone(),
    );
    assert!(matches!(reader.reload_once().await, Err(KeyError::NoRing)));
    assert!(!dir.path().join("keyring.json").exists());
    assert!(matches!(
        reader.rotate(false).await,
        Err(KeyError::ReadOnly)
    ));
    assert_eq!(reader.health().consecutive_failures, 1);

    let writer = Rotator::new(
        Arc::new(FileKeySource::new(dir.path()).unwrap()),
        Keys::empty(),
        Policy::default(),
        RotationMode::InProcess,
        clock.clone(),
    );
    writer.reload_once().await.unwrap();
    // Even when a plan is due, the reader only loads.
    clock.advance(DAY * 24);
    let read = reader.reload_once().await.unwrap();
    assert!(read.transitions.is_empty());
    assert_eq!(read.version, 1);
    assert_eq!(reader.health().consecutive_failures, 0);
}

/// Two operators press "rotate now" on two instances, one after the other, each having
/// seen the same active key: the key is rotated once, not twice. An emergency rotation
/// acts on the stored active key whatever this instance last loaded.
#[tokio::test]
async fn rotate_now_on_a_second_instance_after_the_first_rotated_does_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(t0());
    let (a, b) = (
        file_rotator(dir.path(), &clock),
        file_rotator(dir.path(), &clock),
    );
    a.reload_once().await.unwrap();
    b.reload_once().await.unwrap();
    let shown = b.keys().status(clock.now()).active_kid.unwrap();

    clock.advance(HOUR);
    let first = a.rotate(false).await.unwrap();
    assert!(!first.transitions.is_empty());
    let second = b.rotate(false).await.unwrap();
    assert!(second.transitions.is_empty(), "{second:?}");
    assert_eq!(second.version, first.version);
    // The second instance now serves what the first wrote.
    assert_eq!(b.keys().ring(), a.keys().ring());
    assert_ne!(b.keys().status(clock.now()).active_kid, Some(shown));

    // Asked again, now that it serves the new key, it rotates that one.
    let third = b.rotate(false).await.unwrap();
    assert!(!third.transitions.is_empty());
    assert_eq!(third.version, first.version + 1);

    // An emergency on the instance that has not reloaded still retires the stored key.
    let stored_active = b.keys().status(clock.now()).active_kid.unwrap();
    let emergency = a.rotate(true).await.unwrap();
    assert!(
        emergency
            .transitions
            .iter()
            .any(|t| t.kid == stored_active && t.to == Some(KeyState::Retired)),
        "{emergency:?}"
    );
}

/// A ring file on which another writer brings the rotation forward (or, with
/// `emergency`, rotates in emergency) just before this instance's first write, so that
/// the write conflicts and the rotator retries.
struct RotatedUnderneath {
    inner: FileKeySource,
    at: time::OffsetDateTime,
    emergency: bool,
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl KeySource for RotatedUnderneath {
    async fn load(&self) -> Result<Option<keyrotation::Versioned<KeyRing>>, KeyError> {
        self.inner.load().await
    }

    async fn store(
        &self,
        ring: &KeyRing,
        expected_version: Option<u64>,
    ) -> Result<StoreOutcome, KeyError> {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let stored = self.inner.load().await?.unwrap();
            let policy = Policy::default();
            let other = if self.emergency {
                keyrotation::emergency_rotate(
                    &stored.value,
                    &policy,
                    self.at,
                    "the other operator",
                    &Suspects::EveryVerifyingKey,
                )?
            } else {
                keyrotation::rotate_now(&stored.value, &policy, self.at)?
            };
            self.inner.store(&other.ring, Some(stored.version)).await?;
        }
        self.inner.store(ring, expected_version).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Writes a ring two days before its first key retires, its successor waiting, into
/// `dir`: the active kid and the waiting kid.
async fn ring_with_a_waiting_key(
    dir: &std::path::Path,
    clock: &ManualClock,
) -> (keyrotation::Kid, keyrotation::Kid) {
    let writer = file_rotator(dir, clock);
    writer.reload_once().await.unwrap();
    let first = writer.keys().status(clock.now()).active_kid.unwrap();
    let retire_at = writer.keys().ring().key(&first).unwrap().retire_at;
    clock.set(retire_at - DAY * 2);
    writer.reload_once().await.unwrap();
    let waiting = writer
        .keys()
        .ring()
        .keys
        .iter()
        .find(|k| k.state_at(clock.now()) == KeyState::Next)
        .unwrap()
        .kid
        .clone();
    (first, waiting)
}

/// On a ring with a waiting key, an instance declares every verifying key compromised
/// while another writer's write (an emergency, or a rotation brought forward) lands just
/// before its own: the outcome, the ring it then holds, the first and the waiting kid, and
/// the instant.
async fn emergency_over_another_writer(
    other_emergency: bool,
) -> (
    keyrotation::ReloadOutcome,
    KeyRing,
    keyrotation::Kid,
    keyrotation::Kid,
    time::OffsetDateTime,
) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(t0());
    let (first, waiting) = ring_with_a_waiting_key(dir.path(), &clock).await;
    let operator = Rotator::new(
        Arc::new(RotatedUnderneath {
            inner: FileKeySource::new(dir.path()).unwrap(),
            at: clock.now(),
            emergency: other_emergency,
            armed: std::sync::atomic::AtomicBool::new(true),
        }),
        Keys::empty(),
        Policy::default(),
        RotationMode::InProcess,
        Arc::new(clock.clone()),
    );
    let out = operator
        .emergency("a leak".to_owned(), Suspects::EveryVerifyingKey)
        .await
        .unwrap();
    assert_eq!(out.conflicts, 1);
    (out, operator.keys().ring(), first, waiting, clock.now())
}

/// Two operators declare the same compromise at once: the second's retry finds the keys
/// it named retired (or discarded) by the first, and writes nothing more.
#[tokio::test]
async fn an_emergency_retried_after_another_emergency_writes_nothing_more() {
    let (out, ring, first, waiting, now) = emergency_over_another_writer(true).await;
    assert!(out.transitions.is_empty(), "{:?}", out.transitions);
    assert!(ring.key(&first).unwrap().compromised.is_some());
    assert!(ring.key(&waiting).is_none());
    // the other operator's fresh key signs
    assert!(ring.signing_key_at(now).unwrap().compromised.is_none());
}

/// The keys an emergency retires are named from the ring it first loaded: a key that was
/// waiting to sign then (stored with the others, so leaked with them) and that another
/// instance activated before the retry is retired too.
#[tokio::test]
async fn an_emergency_retried_after_a_conflict_retires_the_key_that_was_waiting() {
    let (_, ring, first, waiting, now) = emergency_over_another_writer(false).await;
    for kid in [&first, &waiting] {
        assert!(
            ring.key(kid).unwrap().compromised.is_some(),
            "{kid} not retired"
        );
    }
    let signing = ring.signing_key_at(now).unwrap();
    assert!(signing.kid != first && signing.kid != waiting);
}
