//! Portcullis signing keys.
//!
//! The crate owns the JWT signing key ring and its life cycle:
//!
//! * [`KeyRing`] / [`KeyRecord`] — the stored ring: every key with its algorithm, its private
//!   key (PKCS#8, never printed) and the planned instants of its transitions
//!   `next → active → retiring → retired`.
//! * [`plan`], [`rotate_now`], [`emergency_rotate`] — pure functions of `(ring, policy, now)`
//!   that say what must be written and return the [`Transition`]s to audit. The *effective*
//!   state of a key is always computed from its stored instants and `now`
//!   ([`KeyRecord::state_at`]), so every instance — even a read-only one — switches signing
//!   key at the same planned instant.
//! * [`Keys`] — the live, cheaply cloneable handle the gateway signs and verifies with
//!   (an `ArcSwap` of the loaded ring; key material is parsed once per ring version).
//! * [`KeySource`] — where the ring lives: [`VaultKeySource`] (KV v2 with check-and-set) or
//!   [`FileKeySource`] (the `--dev` source).
//! * [`Rotator`] — reloads the ring on an interval, plans and writes (check-and-set) when this
//!   instance may write, and publishes the ring into [`Keys`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod clock;
pub mod duration;
mod error;
mod keys;
mod material;
mod model;
mod plan;
mod policy;
mod rotator;
mod source;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::KeyError;
pub use keys::{
    KeyStatus, Keys, RingStatus, Signer, TokenType, ValidityWindow, Verified, VerifyParams,
};
pub use model::{Compromise, KeyAlgorithm, KeyRecord, KeyRing, KeyState, Kid, PrivateKey};
pub use plan::{
    ACTIVATION_BACKDATE, Plan, Suspects, Transition, TransitionReason, emergency_rotate,
    emergency_rotate_around, plan, plan_around, rotate_now, rotate_now_around,
};
pub use policy::Policy;
pub use rotator::{ReloadOutcome, RotationMode, Rotator, RotatorHealth};
pub use source::file::FileKeySource;
pub use source::vault::{AuthStatus, VaultAuth, VaultKeySource, VaultSettings};
pub use source::{KeySource, StoreOutcome, Versioned};
