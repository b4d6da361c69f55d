//! Agent pairing by code, RFC 8628's device authorization grant, on the
//! base domain:
//!
//! - `POST /oauth/device_authorization`: an agent without a credential
//!   asks for a pairing (no caller; [`PAIRINGS_PER_MINUTE`] per address).
//!   The answer is RFC 8628's: `device_code`, `user_code`,
//!   `verification_uri` (`https://<base>/pair`),
//!   `verification_uri_complete`, `expires_in`, `interval`.
//! - `POST /oauth/token` with `grant_type=urn:ietf:params:oauth:grant-type:device_code`:
//!   the agent polls. Errors are RFC 6749's JSON (`authorization_pending`,
//!   `slow_down`, `access_denied`, `expired_token`, `invalid_grant`); on
//!   approval the `access_token` is the device's new agent credential.
//!
//! The owner's side (entering the code, picking the device) is the
//! console's `/pair` page, which calls [`enter_code`]. The token endpoint
//! also takes apps' authorization codes ([`crate::app_consent`]).

use std::net::IpAddr;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header;
use hyper::{Request, Response, StatusCode};
use relay_store::pairing::{PairingDecision, PendingPairing, PollOutcome};
use serde_json::json;

use crate::limiter::{GuessRefusal, LimitKey};
use crate::oauth_answer::{oauth_error, oauth_json};
use crate::state::EdgeState;

/// The device code grant's `grant_type` (RFC 8628 section 3.4).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Whether `path` is one of the OAuth endpoints.
pub fn is_oauth_path(path: &str) -> bool {
    path == "/oauth/device_authorization" || path == "/oauth/token"
}

/// Serves the OAuth endpoints.
pub async fn handle(
    request: Request<Incoming>,
    state: &EdgeState,
    peer: IpAddr,
) -> Response<Full<Bytes>> {
    if request.method() != hyper::Method::POST {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        );
    }
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or(&state.config.public.base_domain)
        .to_owned();
    let path = request.uri().path().to_owned();
    let form = match crate::form::read_form(request).await {
        Ok(form) => form,
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the form is too large or could not be read",
            );
        }
    };
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    match path.as_str() {
        "/oauth/device_authorization" => device_authorization(state, peer, &host).await,
        _ if too_many(state, peer) => oauth_error(
            StatusCode::TOO_MANY_REQUESTS,
            "slow_down",
            "too many requests from this address; try again in a minute",
        ),
        _ => match field("grant_type") {
            DEVICE_CODE_GRANT => poll(state, peer, field("device_code")).await,
            "authorization_code" => crate::app_consent::token(state, &form).await,
            "" => oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is missing",
            ),
            _ => oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "this relay takes the device_code and authorization_code grants",
            ),
        },
    }
}

/// Token requests count against the address's API requests a minute
/// (the tenant API's budget): whether this one is over it.
fn too_many(state: &EdgeState, peer: IpAddr) -> bool {
    let now = Instant::now();
    let address = LimitKey::Address(peer);
    if state.api_requests.is_blocked(&address, now) {
        return true;
    }
    state
        .api_requests
        .record_failure(std::slice::from_ref(&address), now);
    false
}

async fn device_authorization(
    state: &EdgeState,
    peer: IpAddr,
    host: &str,
) -> Response<Full<Bytes>> {
    let now = Instant::now();
    let address = LimitKey::Address(peer);
    if state.pairing_starts.is_blocked(&address, now) {
        state
            .metrics
            .pairing
            .with_label_values(&["start_limited"])
            .inc();
        return oauth_error(
            StatusCode::TOO_MANY_REQUESTS,
            "slow_down",
            "too many pairings from this address; try again in a minute",
        );
    }
    state
        .pairing_starts
        .record_failure(std::slice::from_ref(&address), now);
    let started = match state
        .authenticator
        .store()
        .start_pairing(&peer.to_string())
        .await
    {
        Ok(started) => started,
        Err(error) => {
            tracing::warn!(%error, "cannot start a pairing");
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "try again later",
            );
        }
    };
    state.metrics.pairing.with_label_values(&["started"]).inc();
    tracing::info!(pairing = %started.id, "pairing started");
    let verification_uri = format!("https://{host}/pair");
    oauth_json(
        StatusCode::OK,
        &json!({
            "device_code": started.device_code.reveal(),
            "user_code": started.user_code,
            "verification_uri": verification_uri,
            "verification_uri_complete": format!("{verification_uri}?code={}", started.user_code),
            "expires_in": relay_store::pairing::PAIRING_MILLIS / 1000,
            "interval": started.interval_ms / 1000,
        }),
    )
}

async fn poll(state: &EdgeState, peer: IpAddr, device_code: &str) -> Response<Full<Bytes>> {
    let outcome = match state.authenticator.store().poll_pairing(device_code).await {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::warn!(%error, "cannot look at a pairing");
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "try again later",
            );
        }
    };
    let count = |result: &str| state.metrics.pairing.with_label_values(&[result]).inc();
    match outcome {
        PollOutcome::Pending => {
            count("poll_pending");
            oauth_error(
                StatusCode::BAD_REQUEST,
                "authorization_pending",
                "the owner has not entered the code yet",
            )
        }
        PollOutcome::SlowDown { interval_ms } => {
            count("poll_slow_down");
            oauth_json(
                StatusCode::BAD_REQUEST,
                &json!({
                    "error": "slow_down",
                    "error_description": "polled too soon",
                    "interval": interval_ms / 1000,
                }),
            )
        }
        PollOutcome::Denied => {
            count("poll_denied");
            oauth_error(
                StatusCode::BAD_REQUEST,
                "access_denied",
                "the owner denied this pairing",
            )
        }
        PollOutcome::Expired => {
            count("poll_expired");
            oauth_error(
                StatusCode::BAD_REQUEST,
                "expired_token",
                "the pairing expired or was used; start a new one",
            )
        }
        PollOutcome::Unknown => {
            count("poll_unknown");
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "not a device code this relay gave",
            )
        }
        PollOutcome::Approved {
            device_id,
            tenant_id,
            credential,
        } => {
            count("paired");
            // The old credential, if any, was rotated away: its agent goes.
            let store = state.authenticator.store();
            if let Err(error) = store
                .record_audit(
                    &tenant_id,
                    relay_store::AuditRecord {
                        actor: "pairing",
                        action: "agent.paired",
                        target: &device_id,
                        address: &peer.to_string(),
                        detail: &format!("credential {}", credential.id),
                    },
                )
                .await
            {
                tracing::warn!(%error, "cannot audit a pairing");
            }
            tracing::info!(device = %device_id, credential = %credential.id, "agent paired");
            oauth_json(
                StatusCode::OK,
                &json!({
                    "access_token": credential.reveal(),
                    "token_type": "Bearer",
                    "device_id": device_id,
                }),
            )
        }
    }
}

/// What the owner's code entry found.
#[derive(Debug)]
pub enum CodeEntry {
    /// A pending pairing.
    Found(PendingPairing),
    /// No pending pairing has this code (wrong, expired, decided).
    NotFound,
    /// Too many wrong codes: from this address, this tenant, or everyone.
    Limited(GuessRefusal),
}

/// Looks up a code an owner of `tenant_id` typed, within the guess limits:
/// each wrong code counts against the address, the tenant and the total.
pub async fn enter_code(
    state: &EdgeState,
    tenant_id: &str,
    peer: IpAddr,
    typed: &str,
) -> Result<CodeEntry, relay_store::StoreError> {
    let now = Instant::now();
    let count = |result: &str| state.metrics.pairing.with_label_values(&[result]).inc();
    if let Err(refusal) = state.pairing_guesses.check(peer, tenant_id, now) {
        count("code_limited");
        return Ok(CodeEntry::Limited(refusal));
    }
    match state.authenticator.store().pending_pairing(typed).await? {
        Some(pending) => {
            count("code_found");
            Ok(CodeEntry::Found(pending))
        }
        None => {
            count("code_wrong");
            state.pairing_guesses.wrong(peer, tenant_id, now);
            Ok(CodeEntry::NotFound)
        }
    }
}

/// Records the owner's decision on a pairing found with [`enter_code`].
pub async fn decide(
    state: &EdgeState,
    pairing_id: &str,
    decision: &PairingDecision,
) -> Result<bool, relay_store::StoreError> {
    let decided = state
        .authenticator
        .store()
        .decide_pairing(pairing_id, decision)
        .await?;
    let label = match (decided, decision) {
        (false, _) => "decision_late",
        (true, PairingDecision::Approve { .. }) => "approved",
        (true, PairingDecision::Deny { .. }) => "denied",
    };
    state.metrics.pairing.with_label_values(&[label]).inc();
    Ok(decided)
}
