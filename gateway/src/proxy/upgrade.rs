//! Upgraded (WebSocket) connections live no longer than the credential that opened them.
//!
//! Once a handshake is answered `101`, the client's and the node's connections are joined
//! and bytes flow both ways with no request left to authenticate. So each upgraded
//! connection of an authenticated route holds a [`Lease`] on the credential of its
//! handshake, and both connections are closed when the lease runs out:
//!
//! - **bearer routes**: at the token's `exp` plus `tokens.leeway`, the instant a request
//!   with it is refused; and at the first check, every [`BEARER_CHECK_INTERVAL`], that
//!   refuses the token as a request with it would be refused now
//!   (`KeyService::verify_access`): its client cut off ([`crate::cutoff`]: disabled,
//!   deleted, `revoke-tokens`), or its signing key no longer trusted by the ring held (an
//!   emergency rotation). The check is a lookup in the memory of verified tokens, a look
//!   at the cutoffs and at the ring, all in this process; a signature check when the
//!   token is not in the memory: after the ring changed (the memory is dropped then),
//!   after it was evicted, and every check with `tokens.verified_cache_entries = 0`, so
//!   then each open bearer connection costs one signature check per interval.
//! - **session routes** (console cookies): at the first check, every
//!   `proxy.upgrade_session_check_interval` and once right after the upgrade, that finds
//!   the session's refresh family gone or expired in the refresh store (signed out, signed
//!   out everywhere, back-channel logout, revoked by an operator, a break-glass account
//!   changed by a `portcullis users` command that reached Redis), and at the session's
//!   maximum lifetime (`sso.session_max_lifetime` after the login), which a check reads
//!   (the handshake's cookie does not carry the login time). Turning
//!   `sso.local_accounts` off revokes no family: break-glass sessions then end at their
//!   next renewal, which a WebSocket never makes, so their connections last until the
//!   session is revoked, expires or reaches its maximum lifetime.
//!   A store that cannot be reached is not an end at once, but it is not a pass either:
//!   console requests stop once their access cookie expires, since renewing it needs the
//!   store. So the connection is closed ([`EndReason::SessionUnverifiable`]) once
//!   `sso.access_token_lifetime` plus `tokens.leeway` have passed since the session was
//!   last confirmed (by the handshake or by a check) while the checks fail; a check that
//!   the store answers in time confirms it again. Failures are counted each, and logged
//!   at WARN at most once per check interval for the whole proxy, with how many failed.
//!   The console access token of the handshake is not what bounds a connection whose
//!   session can be checked: the browser renews it with the next request, which a
//!   WebSocket never makes.
//! - **public routes**: nothing to end.
//!
//! Every upgraded connection, of any route, is also closed the same way when the instance
//! starts to shut down ([`EndReason::Shutdown`]): a WebSocket has no end of its own for
//! the graceful drain to wait for, and its client reconnects through another instance,
//! while the instance's ordinary requests in flight get `server.shutdown_grace`.
//!
//! Each upgraded connection costs one timer (the soonest of its next check and its ends)
//! and no work per byte. The bounds: a cutoff or a sign-out made on another instance
//! reaches this one within [`crate::cutoff::RELOAD_INTERVAL`] (cutoffs) or at once (the
//! store is shared), then the connection closes within its check interval. Relying parties
//! behind the proxy are not told anything: a node that authorised the connection by its
//! own means keeps whatever state it has.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::http::HeaderValue;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use keyrotation::KeyError;
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::authn;
use crate::refresh::FamilyId;
use crate::sso::session::{self, ConsoleUser};
use crate::state::AppState;
use crate::verified::VerifiedAccess;

/// How often an upgraded connection of a bearer route checks that its token is still
/// accepted: the interval at which instances read the cutoffs, so a cutoff made elsewhere
/// closes it within about twice that.
pub const BEARER_CHECK_INTERVAL: Duration = crate::cutoff::RELOAD_INTERVAL;

/// How long closing an ended connection may wait for each side to take its end (TLS
/// `close_notify`, TCP FIN) before it is dropped.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The longest a timer is set for, so that an instant far ahead is one the runtime can
/// count to (tokens and sessions live far less).
const FAR_FUTURE: Duration = Duration::from_secs(365 * 86_400);

/// Open upgraded connections (gauge).
const OPEN_METRIC: &str = "portcullis_proxy_upgrades_open";
/// Upgraded connections closed because their credential ended or the instance is shutting
/// down (counter, by `reason`).
const ENDED_METRIC: &str = "portcullis_proxy_upgrades_ended_total";
/// Session checks of upgraded connections the refresh store did not answer (counter).
const CHECK_FAILURES_METRIC: &str = "portcullis_proxy_upgrade_session_check_failures_total";

/// Why an upgraded connection was closed by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The bearer token expired (its `exp` plus the leeway passed).
    Expired,
    /// The token's client was cut off (disabled, deleted, its tokens revoked).
    CutOff,
    /// The token's signing key is no longer trusted (withdrawn by an emergency rotation).
    KeyWithdrawn,
    /// The console session ended: its refresh family is gone or expired, or it reached
    /// its maximum lifetime.
    SessionEnded,
    /// The console session could not be confirmed (the refresh store did not answer) for
    /// longer than a console access cookie lives: `sso.access_token_lifetime` plus
    /// `tokens.leeway` since it was last confirmed.
    SessionUnverifiable,
    /// The instance is shutting down (any route, public ones too).
    Shutdown,
}

impl EndReason {
    /// Every reason, for the metric's series.
    pub const ALL: [Self; 6] = [
        Self::Expired,
        Self::CutOff,
        Self::KeyWithdrawn,
        Self::SessionEnded,
        Self::SessionUnverifiable,
        Self::Shutdown,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::CutOff => "cut_off",
            Self::KeyWithdrawn => "key_withdrawn",
            Self::SessionEnded => "session_ended",
            Self::SessionUnverifiable => "session_unverifiable",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Makes every series of the upgrade metrics exist (at 0), so that a rate or an alert on
/// them has a series before the first connection ends. Once per proxy, at start.
pub fn register_metrics() {
    metrics::gauge!(OPEN_METRIC).increment(0.0);
    metrics::counter!(CHECK_FAILURES_METRIC).increment(0);
    for reason in EndReason::ALL {
        metrics::counter!(ENDED_METRIC, "reason" => reason.as_str()).increment(0);
    }
}

/// Paces the WARN of session checks the refresh store did not answer: in an outage every
/// open console connection fails its check each interval, and one line per failure would
/// be thousands of lines. At most one line per `every`, for the whole proxy, saying how
/// many checks failed since the last one. (The failures are counted one by one in
/// [`CHECK_FAILURES_METRIC`].)
#[derive(Debug)]
pub struct CheckFailureLog {
    every: Duration,
    pace: Mutex<Pace>,
}

/// [`CheckFailureLog`]'s record: when it last wrote, and the failures since.
#[derive(Debug, Default)]
struct Pace {
    last: Option<Instant>,
    failures: u64,
}

// === impl CheckFailureLog ===

impl CheckFailureLog {
    /// A log writing at most once per `every` (the session check interval).
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            pace: Mutex::new(Pace::default()),
        }
    }

    /// Records one failed check at `now`; `Some(n)` when a line is due, `n` the failures
    /// since the last line, this one included.
    fn failed(&self, now: Instant) -> Option<u64> {
        // a panic while holding it leaves a count, not a broken invariant: go on with it
        let mut pace = self.pace.lock().unwrap_or_else(PoisonError::into_inner);
        pace.failures = pace.failures.saturating_add(1);
        if pace
            .last
            .and_then(|last| last.checked_add(self.every))
            .is_some_and(|next| now < next)
        {
            return None;
        }
        pace.last = Some(now);
        Some(std::mem::take(&mut pace.failures))
    }
}

/// What an upgraded connection's credential was, and what to check of it.
enum Credential {
    /// A bearer token: its `Authorization` value (never logged), its client and subject.
    Bearer {
        authorization: HeaderValue,
        client_id: Box<str>,
        subject: Box<str>,
    },
    /// A console session: its refresh family (`None` for an access token that names
    /// none: then the token's own end bounds the connection), the user's login name and
    /// subject.
    Session {
        family: Option<FamilyId>,
        user: Box<str>,
        subject: Box<str>,
        /// The proxy's pacing of check-failure WARNs.
        failures: Arc<CheckFailureLog>,
    },
}

/// The credential of one upgraded connection's handshake, for as long as the connection
/// lives. Made only for upgrade handshakes of authenticated routes.
pub struct Lease {
    state: AppState,
    /// The route's metrics label, `proxy:<prefix>`.
    route: Arc<str>,
    credential: Credential,
    /// How often the credential is checked; `None`: never (only its deadline ends it).
    every: Option<Duration>,
    /// When the credential ends by its own terms, and what that end is called: a token's
    /// `exp` plus leeway; a session's maximum lifetime, once a check has read its login.
    deadline: Option<(Instant, EndReason)>,
    /// When the session was last confirmed, on the instance's clock: the handshake, then
    /// each check the store answered.
    confirmed: OffsetDateTime,
    /// While session checks fail: when the session counts as unverifiable
    /// (`confirmed` + `sso.access_token_lifetime` + `tokens.leeway`).
    unverifiable: Option<Instant>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("route", &self.route)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

// === impl Lease ===

impl Lease {
    /// The lease of a handshake on a bearer route, authorised by `verified`, presented
    /// in `authorization`.
    pub fn bearer(
        state: &AppState,
        route: Arc<str>,
        verified: &VerifiedAccess,
        authorization: &HeaderValue,
    ) -> Self {
        let claims = &verified.claims;
        let leeway = state.keys.verify_params().leeway;
        let until = OffsetDateTime::from_unix_timestamp(claims.exp)
            .map(|exp| plus(exp, leeway))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        Self {
            state: state.clone(),
            route,
            credential: Credential::Bearer {
                authorization: authorization.clone(),
                client_id: claims.client_id.as_str().into(),
                subject: claims.sub.as_str().into(),
            },
            every: Some(BEARER_CHECK_INTERVAL),
            deadline: Some((instant_at(state, until), EndReason::Expired)),
            confirmed: state.keys.now(),
            unverifiable: None,
        }
    }

    /// The lease of a handshake on a session route, by `user`'s console session, checked
    /// `every` (`proxy.upgrade_session_check_interval`), failed checks logged through
    /// `failures`.
    pub fn session(
        state: &AppState,
        route: Arc<str>,
        user: &ConsoleUser,
        every: Duration,
        failures: Arc<CheckFailureLog>,
    ) -> Self {
        let family = user
            .session
            .as_deref()
            .and_then(|f| FamilyId::parse(f).ok());
        // without a family to check, the access token that stood for the session is all
        // there is: the connection lasts as long as it does
        let deadline = family.is_none().then(|| {
            let leeway = state.keys.verify_params().leeway;
            let until = OffsetDateTime::from_unix_timestamp(user.expires_at)
                .map(|exp| plus(exp, leeway))
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            (instant_at(state, until), EndReason::Expired)
        });
        Self {
            state: state.clone(),
            route,
            every: family.is_some().then_some(every),
            credential: Credential::Session {
                family,
                user: user.user.as_str().into(),
                subject: user.subject.as_str().into(),
                failures,
            },
            deadline,
            // the handshake's cookie was accepted just now: as good as a check
            confirmed: state.keys.now(),
            unverifiable: None,
        }
    }

    /// Resolves when the credential has ended, with why; never while it stays good.
    pub async fn ended(&mut self) -> EndReason {
        let every = self.every;
        // a session is checked once right away: the check reads its login time, so its
        // maximum lifetime bounds the connection from the start, not from the first
        // interval on (the handshake's cookie does not carry the login time)
        let first = match self.credential {
            Credential::Session { .. } => Duration::ZERO,
            Credential::Bearer { .. } => every.unwrap_or(Duration::ZERO),
        };
        let mut next_check = every.map(|_| Instant::now() + first);
        loop {
            let wake = [
                next_check,
                self.deadline.map(|(end, _)| end),
                self.unverifiable,
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(wake) = wake else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(wake).await;
            if let Some((end, reason)) = self.deadline
                && Instant::now() >= end
            {
                return reason;
            }
            // a check due now goes first: the store may answer again and confirm it
            if next_check.is_some_and(|at| Instant::now() >= at) {
                if let Some(reason) = self.check().await {
                    return reason;
                }
                next_check = every.map(|d| Instant::now() + d);
            }
            if self.unverifiable.is_some_and(|at| Instant::now() >= at) {
                return EndReason::SessionUnverifiable;
            }
        }
    }

    /// Whether the credential has ended, as far as can be told now.
    async fn check(&mut self) -> Option<EndReason> {
        match &self.credential {
            Credential::Bearer { authorization, .. } => bearer_refusal(&self.state, authorization),
            Credential::Session {
                family: Some(family),
                ..
            } => {
                let family = family.clone();
                self.session_check(&family).await
            }
            Credential::Session { family: None, .. } => None,
        }
    }

    /// Reads the session's family: gone or expired ends the connection; alive confirms it
    /// and sets the deadline at its maximum lifetime; a store that cannot answer ends
    /// nothing until `sso.access_token_lifetime` plus `tokens.leeway` have passed since
    /// the last confirmation (then [`Self::ended`] ends it).
    async fn session_check(&mut self, family: &FamilyId) -> Option<EndReason> {
        let now = self.state.keys.now();
        match self.state.refresh.live_family(family, now).await {
            Ok(Some(found)) => {
                let end = session::session_end(&self.state, found.auth_time);
                if now >= end {
                    return Some(EndReason::SessionEnded);
                }
                self.confirmed = now;
                self.unverifiable = None;
                // the login time never changes: the first deadline read stays unless a
                // later one is sooner (the instance's clock stepped forward)
                let at = instant_at(&self.state, end);
                let at = self.deadline.map_or(at, |(set, _)| set.min(at));
                self.deadline = Some((at, EndReason::SessionEnded));
                None
            }
            Ok(None) => Some(EndReason::SessionEnded),
            Err(e) => {
                metrics::counter!(CHECK_FAILURES_METRIC).increment(1);
                let leeway = self.state.keys.verify_params().leeway;
                let lifetime = self.state.sso.settings().access_token_lifetime;
                let until = plus(plus(self.confirmed, lifetime), leeway);
                if self.unverifiable.is_none() {
                    self.unverifiable = Some(instant_at(&self.state, until));
                }
                if let Credential::Session {
                    user,
                    subject,
                    failures,
                    ..
                } = &self.credential
                    && let Some(failed) = failures.failed(Instant::now())
                {
                    tracing::warn!(
                        route = %self.route,
                        user = &**user,
                        subject = &**subject,
                        session = %family,
                        failed,
                        unverifiable_at = %until,
                        error = %crate::error::chain(&e),
                        "session checks of open WebSockets failed (`failed`: how many since \
                         the last such line, this one's included); each is closed once its \
                         session has gone unconfirmed for sso.access_token_lifetime plus \
                         tokens.leeway"
                    );
                }
                None
            }
        }
    }

    /// Counts and logs the end of the connection for `reason`.
    fn record_end(&self, reason: EndReason) {
        count_end(reason);
        if reason == EndReason::Shutdown {
            // every open connection ends at once then: a line each only when asked for
            tracing::debug!(
                route = %self.route,
                "upgraded connection closed: the instance is shutting down"
            );
            return;
        }
        match &self.credential {
            Credential::Bearer {
                client_id, subject, ..
            } => tracing::info!(
                route = %self.route,
                reason = reason.as_str(),
                client_id = &**client_id,
                subject = &**subject,
                "upgraded connection closed: the token that opened it is no longer accepted"
            ),
            Credential::Session {
                family,
                user,
                subject,
                ..
            } => tracing::info!(
                route = %self.route,
                reason = reason.as_str(),
                user = &**user,
                subject = &**subject,
                session = family.as_ref().map_or("", FamilyId::as_str),
                "upgraded connection closed: the console session that opened it ended"
            ),
        }
    }
}

/// Why the token in `authorization` would be refused now, if it would: the verification
/// a request gets, through the memory of verified tokens. A token that verified once stops
/// verifying by its time window (expired; or not valid yet, when the instance's clock
/// stepped back before its `nbf`), a cutoff of its client, or its key leaving the ring's
/// trust; anything else it could meet (an unknown `kid`, a signature that no longer
/// checks) is the ring no longer holding its key.
fn bearer_refusal(state: &AppState, authorization: &HeaderValue) -> Option<EndReason> {
    let Some(token) = authn::bearer_token(authorization) else {
        return Some(EndReason::KeyWithdrawn);
    };
    match state.keys.verify_access(token) {
        Ok(_) => None,
        Err(KeyError::Expired | KeyError::NotYetValid) => Some(EndReason::Expired),
        Err(KeyError::Revoked) => Some(EndReason::CutOff),
        Err(_) => Some(EndReason::KeyWithdrawn),
    }
}

/// Counts an end of an upgraded connection for `reason`.
fn count_end(reason: EndReason) {
    metrics::counter!(ENDED_METRIC, "reason" => reason.as_str()).increment(1);
}

/// `at` plus `d`; `at` when that is past what a date can hold (the sooner end wins).
fn plus(at: OffsetDateTime, d: Duration) -> OffsetDateTime {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| at.checked_add(d))
        .unwrap_or(at)
}

/// The runtime's instant for `at` on the instance's clock (the clock tokens and sessions
/// are judged by); now when it is past.
fn instant_at(state: &AppState, at: OffsetDateTime) -> Instant {
    let left = Duration::try_from(at - state.keys.now())
        .unwrap_or(Duration::ZERO)
        .min(FAR_FUTURE);
    let now = Instant::now();
    now.checked_add(left).unwrap_or(now)
}

/// Counts an upgraded connection in [`OPEN_METRIC`] while it lives.
struct Open;

impl Open {
    fn new() -> Self {
        metrics::gauge!(OPEN_METRIC).increment(1.0);
        Self
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_METRIC).decrement(1.0);
    }
}

/// Relays bytes between the client's and the node's upgraded connections until either
/// side closes, or until `lease` runs out or `closing` (the instance's shutdown, a token
/// of this connection's own) is cancelled: then both are closed.
pub async fn join(
    client: Upgraded,
    node: Upgraded,
    mut lease: Option<Lease>,
    closing: CancellationToken,
) {
    let _open = Open::new();
    let mut client = TokioIo::new(client);
    let mut node = TokioIo::new(node);
    let reason = {
        let relay = tokio::io::copy_bidirectional(&mut client, &mut node);
        let ended = async {
            match lease.as_mut() {
                Some(lease) => lease.ended().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            relayed = relay => {
                if let Err(e) = relayed {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
                return;
            }
            reason = ended => reason,
            () = closing.cancelled() => EndReason::Shutdown,
        }
    };
    match &lease {
        Some(lease) => lease.record_end(reason),
        None => {
            count_end(reason);
            tracing::debug!(reason = reason.as_str(), "upgraded connection closed");
        }
    }
    // each side is told (TLS `close_notify`, FIN) if it takes it in time; dropped anyway
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = tokio::join!(client.shutdown(), node.shutdown());
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_failures_are_logged_at_most_once_per_interval_with_their_count() {
        let log = CheckFailureLog::new(Duration::from_secs(30));
        let start = Instant::now();
        assert_eq!(log.failed(start), Some(1));
        // a thousand sockets failing within the interval: no line
        for i in 0..1000 {
            assert_eq!(log.failed(start + Duration::from_millis(i)), None);
        }
        // the next line, an interval on, counts them all with its own
        assert_eq!(log.failed(start + Duration::from_secs(30)), Some(1001));
        assert_eq!(log.failed(start + Duration::from_secs(31)), None);
    }

    #[test]
    fn an_end_past_what_a_date_holds_is_the_sooner_one() {
        let last = OffsetDateTime::new_utc(time::Date::MAX, time::Time::MIDNIGHT);
        assert_eq!(plus(last, Duration::from_secs(86_400)), last);
        assert_eq!(
            plus(OffsetDateTime::UNIX_EPOCH, Duration::from_secs(60)).unix_timestamp(),
            60
        );
    }
}
