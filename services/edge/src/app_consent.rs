//! An app asks a printer's owner for access: OAuth 2.0's authorization
//! code grant with PKCE (RFC 6749, RFC 7636), for apps an operator
//! registered (`relayctl app register`).
//!
//! - `GET /authorize?response_type=code&client_id=…&redirect_uri=…&scope=read|control&state=…&code_challenge=…&code_challenge_method=S256`:
//!   the console's consent page ([`check`] here, the page in the
//!   console). An unknown `client_id` or a `redirect_uri` the app did not
//!   register, exactly, is shown to the owner and never redirected to;
//!   every other problem goes back to the app as RFC 6749's `error`.
//! - `POST /oauth/token` with `grant_type=authorization_code` ([`token`]):
//!   the code, the same `redirect_uri` and `client_id`, and the PKCE
//!   `code_verifier` give one relay key per printer the owner picked.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use relay_store::Scope;
use relay_store::oauth_apps::{CodeRefusal, Exchange, OAuthApp};
use serde_json::json;

use crate::form::Form;
use crate::oauth_answer::{oauth_error, oauth_json};
use crate::state::EdgeState;

/// An authorization request that passed [`check`].
#[derive(Debug, Clone)]
pub struct AuthorizeRequest {
    pub app: OAuthApp,
    pub redirect_uri: String,
    pub scope: Scope,
    pub state: String,
    pub code_challenge: String,
}

/// Why an authorization request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizeProblem {
    /// Shown to the owner: the app or its redirect URI is not known, so
    /// nothing may be sent there.
    Shown(String),
    /// Sent back to the app (RFC 6749 section 4.1.2.1).
    Redirect {
        uri: String,
        error: &'static str,
        description: String,
        state: String,
    },
}

impl AuthorizeProblem {
    /// Where to send the owner back to, with the error.
    pub fn location(&self) -> Option<String> {
        match self {
            AuthorizeProblem::Shown(_) => None,
            AuthorizeProblem::Redirect {
                uri,
                error,
                description,
                state,
            } => Some(with_query(
                uri,
                &[
                    ("error", error),
                    ("error_description", description),
                    ("state", state),
                ],
            )),
        }
    }
}

/// Percent-encodes a query value (RFC 3986's unreserved characters stay).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `uri` with `parameters` added to its query (empty values left out).
pub fn with_query(uri: &str, parameters: &[(&str, &str)]) -> String {
    let mut out = uri.to_owned();
    let mut separator = if uri.contains('?') { '&' } else { '?' };
    for (name, value) in parameters {
        if value.is_empty() {
            continue;
        }
        out.push(separator);
        out.push_str(name);
        out.push('=');
        out.push_str(&encode(value));
        separator = '&';
    }
    out
}

/// Checks an authorization request's parameters (from the query, or the
/// consent form's hidden fields).
pub async fn check(state: &EdgeState, params: &Form) -> Result<AuthorizeRequest, AuthorizeProblem> {
    let field = |name: &str| params.get(name).map(String::as_str).unwrap_or_default();
    let app = match state.authenticator.store().app(field("client_id")).await {
        Ok(Some(app)) => app,
        Ok(None) => {
            return Err(AuthorizeProblem::Shown(
                "This app is not registered with this relay (unknown client_id).".into(),
            ));
        }
        Err(error) => {
            tracing::warn!(%error, "cannot look an app up");
            return Err(AuthorizeProblem::Shown(
                "The relay cannot look this app up now: try again later.".into(),
            ));
        }
    };
    let redirect_uri = field("redirect_uri");
    if !app.redirects_to(redirect_uri) {
        return Err(AuthorizeProblem::Shown(format!(
            "{} asked to send you back to an address it did not register (redirect_uri); \
             nothing was sent there.",
            app.name
        )));
    }
    let back = |error: &'static str, description: &str| AuthorizeProblem::Redirect {
        uri: redirect_uri.to_owned(),
        error,
        description: description.to_owned(),
        state: field("state").to_owned(),
    };
    if field("response_type") != "code" {
        return Err(back(
            "unsupported_response_type",
            "response_type must be code",
        ));
    }
    let asked: Vec<&str> = field("scope")
        .split(' ')
        .filter(|s| !s.is_empty())
        .collect();
    let scope = if asked.is_empty() {
        Scope::Read
    } else if asked.iter().all(|s| matches!(*s, "read" | "control")) {
        if asked.contains(&"control") {
            Scope::Control
        } else {
            Scope::Read
        }
    } else {
        return Err(back("invalid_scope", "the scopes are read and control"));
    };
    if !app.may_ask(scope) {
        return Err(back(
            "invalid_scope",
            &format!("this app may not ask for {}", scope.as_str()),
        ));
    }
    let challenge = field("code_challenge");
    if field("code_challenge_method") != "S256"
        || challenge.len() != 43
        || !challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        return Err(back(
            "invalid_request",
            "PKCE is required: code_challenge with code_challenge_method=S256",
        ));
    }
    Ok(AuthorizeRequest {
        redirect_uri: redirect_uri.to_owned(),
        scope,
        state: field("state").to_owned(),
        code_challenge: challenge.to_owned(),
        app,
    })
}

/// `POST /oauth/token`, `grant_type=authorization_code`.
pub async fn token(state: &EdgeState, form: &Form) -> Response<Full<Bytes>> {
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    for required in ["code", "client_id", "redirect_uri", "code_verifier"] {
        if field(required).is_empty() {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("{required} is missing"),
            );
        }
    }
    let store = state.authenticator.store();
    match store.app(field("client_id")).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "not an app registered with this relay",
            );
        }
        Err(_) => {
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "try again later",
            );
        }
    }
    let redeemed = store
        .redeem_authorization_code(Exchange {
            code: field("code"),
            client_id: field("client_id"),
            redirect_uri: field("redirect_uri"),
            code_verifier: field("code_verifier"),
        })
        .await;
    let count = |result: &str| state.metrics.app_grants.with_label_values(&[result]).inc();
    match redeemed {
        Ok(Ok(granted)) => {
            count("granted");
            let keys: Vec<_> = granted
                .keys
                .iter()
                .map(|(device, key)| json!({ "device_id": device, "key": key.reveal() }))
                .collect();
            tracing::info!(
                app = field("client_id"),
                keys = keys.len(),
                "an app got its keys"
            );
            let first = &keys[0];
            oauth_json(
                StatusCode::OK,
                &json!({
                    "access_token": first["key"],
                    "token_type": "Bearer",
                    "scope": granted.scope.as_str(),
                    "device_id": first["device_id"],
                    "keys": keys,
                }),
            )
        }
        Ok(Err(refusal)) => {
            count(match refusal {
                CodeRefusal::Unknown => "unknown_code",
                CodeRefusal::Used => "code_reused",
                CodeRefusal::Expired => "code_expired",
                CodeRefusal::OtherClient => "other_client",
                CodeRefusal::OtherRedirect => "other_redirect",
                CodeRefusal::Verifier => "wrong_verifier",
            });
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                &refusal.to_string(),
            )
        }
        Err(error) => {
            tracing::warn!(%error, "cannot exchange a code");
            oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "try again later",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded_and_empty_ones_left_out() {
        assert_eq!(
            with_query(
                "http://127.0.0.1:9/cb",
                &[("code", "rlc_a"), ("state", "a b&c"), ("x", "")]
            ),
            "http://127.0.0.1:9/cb?code=rlc_a&state=a%20b%26c"
        );
        assert_eq!(
            with_query("https://app.example/cb?v=1", &[("error", "access_denied")]),
            "https://app.example/cb?v=1&error=access_denied"
        );
    }
}
