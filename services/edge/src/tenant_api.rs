//! The tenant API: JSON over HTTPS at `https://<base domain>/api/v1/…`
//! (never on a device's host name), for a tenant's admins: devices and
//! their status, app keys, agent credentials, and the audit log of every
//! change. Callers are a console session (a cookie from a one-use login
//! link, `relayctl tenant login-link`; changes carry `X-CSRF-Token`) or a
//! tenant API token (`Authorization: Bearer rlt_…`, never valid for MQTT).
//!
//! Every route is an [`Operation`]; the router and the OpenAPI document
//! (`/api/v1/openapi.json`) are both made from [`Operation::ALL`], so the
//! document cannot name a route the server does not serve, or miss one.
//! Another tenant's ids are "not found", exactly as unknown ones.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use relay_store::admin::{AdminAuthFailure, AdminCaller, AuditRecord};
use relay_store::credential::IssuedCredential;
use relay_store::{AgentCredential, NewApiKey, Scope, StoreError};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::close::Close;
use crate::limiter::LimitKey;
use crate::state::EdgeState;

/// The console session's cookie.
pub const SESSION_COOKIE: &str = "relay_session";
/// The header a cookie caller's changes carry.
pub const CSRF_HEADER: &str = "x-csrf-token";
pub use crate::form::MAX_BODY_BYTES;
/// Audit entries one request returns at most.
const AUDIT_PAGE: i64 = 200;

/// One route of the tenant API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    GetSession,
    EndSession,
    ListDevices,
    CreateDevice,
    GetDevice,
    RenameDevice,
    DeleteDevice,
    ListKeys,
    CreateKey,
    RevokeKey,
    IssueAgentCredential,
    RevokeAgentCredential,
    ApprovePairing,
    DenyPairing,
    ListTokens,
    CreateToken,
    RevokeToken,
    ListAudit,
    OpenApi,
}

impl Operation {
    pub const ALL: [Operation; 19] = [
        Operation::GetSession,
        Operation::EndSession,
        Operation::ListDevices,
        Operation::CreateDevice,
        Operation::GetDevice,
        Operation::RenameDevice,
        Operation::DeleteDevice,
        Operation::ListKeys,
        Operation::CreateKey,
        Operation::RevokeKey,
        Operation::IssueAgentCredential,
        Operation::RevokeAgentCredential,
        Operation::ApprovePairing,
        Operation::DenyPairing,
        Operation::ListTokens,
        Operation::CreateToken,
        Operation::RevokeToken,
        Operation::ListAudit,
        Operation::OpenApi,
    ];

    /// Method, path template, OpenAPI operation id, summary.
    fn describe(self) -> (Method, &'static str, &'static str, &'static str) {
        use Operation as O;
        match self {
            O::GetSession => (
                Method::GET,
                "/api/v1/session",
                "getSession",
                "Who is calling, and the CSRF token a console session's changes carry",
            ),
            O::EndSession => (
                Method::DELETE,
                "/api/v1/session",
                "endSession",
                "Sign out: the console session ends",
            ),
            O::ListDevices => (
                Method::GET,
                "/api/v1/devices",
                "listDevices",
                "The tenant's devices, each with its status",
            ),
            O::CreateDevice => (
                Method::POST,
                "/api/v1/devices",
                "createDevice",
                "Create a device",
            ),
            O::GetDevice => (
                Method::GET,
                "/api/v1/devices/{device_id}",
                "getDevice",
                "One device with its status",
            ),
            O::RenameDevice => (
                Method::PATCH,
                "/api/v1/devices/{device_id}",
                "renameDevice",
                "Rename a device",
            ),
            O::DeleteDevice => (
                Method::DELETE,
                "/api/v1/devices/{device_id}",
                "deleteDevice",
                "Delete a device: its agent credential and keys are revoked, its sessions end",
            ),
            O::ListKeys => (
                Method::GET,
                "/api/v1/keys",
                "listKeys",
                "The tenant's app keys, revoked ones included (never their secrets)",
            ),
            O::CreateKey => (
                Method::POST,
                "/api/v1/keys",
                "createKey",
                "Create an app key; its token is in this answer only",
            ),
            O::RevokeKey => (
                Method::DELETE,
                "/api/v1/keys/{key_id}",
                "revokeKey",
                "Revoke an app key; its live sessions end",
            ),
            O::IssueAgentCredential => (
                Method::POST,
                "/api/v1/devices/{device_id}/agent-credential",
                "issueAgentCredential",
                "Issue the device's agent credential, or rotate it (the old one stops working); the token is in this answer only",
            ),
            O::RevokeAgentCredential => (
                Method::DELETE,
                "/api/v1/devices/{device_id}/agent-credential",
                "revokeAgentCredential",
                "Revoke the device's agent credential; its agent is disconnected",
            ),
            O::ApprovePairing => (
                Method::POST,
                "/api/v1/pairings/approve",
                "approvePairing",
                "Approve the pairing an agent shows the code of, for one of the tenant's devices: the agent gets the device's agent credential (an agent paired before is disconnected)",
            ),
            O::DenyPairing => (
                Method::POST,
                "/api/v1/pairings/deny",
                "denyPairing",
                "Deny the pairing an agent shows the code of: the agent is told so",
            ),
            O::ListTokens => (
                Method::GET,
                "/api/v1/tokens",
                "listTokens",
                "The tenant's API tokens, revoked ones included (never their secrets)",
            ),
            O::CreateToken => (
                Method::POST,
                "/api/v1/tokens",
                "createToken",
                "Create an API token for the tenant API (never valid for MQTT); its secret is in this answer only",
            ),
            O::RevokeToken => (
                Method::DELETE,
                "/api/v1/tokens/{token_id}",
                "revokeToken",
                "Revoke an API token: it is refused from the next request on",
            ),
            O::ListAudit => (
                Method::GET,
                "/api/v1/audit",
                "listAudit",
                "The newest 200 changes, newest first",
            ),
            O::OpenApi => (
                Method::GET,
                "/api/v1/openapi.json",
                "openApi",
                "This document",
            ),
        }
    }

    pub fn method(self) -> Method {
        self.describe().0
    }

    pub fn path(self) -> &'static str {
        self.describe().1
    }

    /// The request body's schema, when it has one.
    fn request_schema(self) -> Option<&'static str> {
        match self {
            Operation::CreateDevice => Some("NewDevice"),
            Operation::RenameDevice => Some("Rename"),
            Operation::CreateKey => Some("NewKey"),
            Operation::ApprovePairing => Some("PairingApproval"),
            Operation::DenyPairing => Some("PairingDenial"),
            Operation::CreateToken => Some("NewToken"),
            _ => None,
        }
    }

    /// The success status and its body's schema.
    fn success(self) -> (StatusCode, Option<Value>) {
        let schema = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
        let array = |name: &str| json!({ "type": "array", "items": schema(name) });
        match self {
            Operation::GetSession => (StatusCode::OK, Some(schema("Session"))),
            Operation::ListDevices => (StatusCode::OK, Some(array("Device"))),
            Operation::CreateDevice => (StatusCode::CREATED, Some(schema("Device"))),
            Operation::GetDevice | Operation::RenameDevice => {
                (StatusCode::OK, Some(schema("Device")))
            }
            Operation::ListKeys => (StatusCode::OK, Some(array("Key"))),
            Operation::CreateKey => (StatusCode::CREATED, Some(schema("CreatedKey"))),
            Operation::IssueAgentCredential => {
                (StatusCode::CREATED, Some(schema("CreatedAgentCredential")))
            }
            Operation::ListAudit => (StatusCode::OK, Some(array("AuditEntry"))),
            Operation::ApprovePairing => (StatusCode::OK, Some(schema("PairingDecided"))),
            Operation::DenyPairing => (StatusCode::OK, Some(schema("PairingDecided"))),
            Operation::ListTokens => (StatusCode::OK, Some(array("Token"))),
            Operation::CreateToken => (StatusCode::CREATED, Some(schema("CreatedToken"))),
            Operation::OpenApi => (StatusCode::OK, Some(json!({ "type": "object" }))),
            Operation::EndSession
            | Operation::DeleteDevice
            | Operation::RevokeKey
            | Operation::RevokeToken
            | Operation::RevokeAgentCredential => (StatusCode::NO_CONTENT, None),
        }
    }

    /// Whether it changes something (audited; a cookie caller needs the
    /// CSRF token).
    pub fn changes(self) -> bool {
        self.method() != Method::GET
    }

    /// Whether it needs no caller.
    fn is_public(self) -> bool {
        self == Operation::OpenApi
    }
}

/// The operation `method` and `path` name, with the path's parameters;
/// `Err(true)` when the path is a route but not with this method.
pub fn route(method: &Method, path: &str) -> Result<(Operation, Vec<String>), bool> {
    let mut path_known = false;
    for operation in Operation::ALL {
        let Some(parameters) = match_template(operation.path(), path) else {
            continue;
        };
        if operation.method() == *method {
            return Ok((operation, parameters));
        }
        path_known = true;
    }
    Err(path_known)
}

fn match_template(template: &str, path: &str) -> Option<Vec<String>> {
    let mut parameters = Vec::new();
    let mut given = path.split('/');
    for part in template.split('/') {
        let segment = given.next()?;
        if part.starts_with('{') {
            if segment.is_empty() || segment.len() > 64 {
                return None;
            }
            parameters.push(segment.to_owned());
        } else if part != segment {
            return None;
        }
    }
    given.next().is_none().then_some(parameters)
}

/// An API error: a stable code, a message for people, and its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "sign in with a login link, or send a tenant API token",
        )
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 400 with `message` (for the console's forms).
    pub fn bad_request_text(message: &str) -> ApiError {
        ApiError::bad_request(message)
    }

    /// 404 with `message`.
    pub fn not_found(message: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 403: a change without its session's CSRF token.
    pub fn forbidden_csrf(message: &str) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "csrf", message)
    }

    /// Its status and message.
    pub fn parts(&self) -> (StatusCode, &str) {
        (self.status, &self.message)
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        json_response(self.status, &body)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::NotFound { what, id } => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} {id:?} not found"),
            ),
            StoreError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            StoreError::InvalidInput(message) => ApiError::bad_request(message),
            StoreError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the store is unavailable; try again",
            ),
            other => {
                tracing::warn!(error = %other, "tenant API: store error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

pub fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn no_content() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// Serves one request for `/api/v1/…` on the base domain.
pub async fn handle(
    request: Request<Incoming>,
    state: &EdgeState,
    peer: IpAddr,
) -> Response<Full<Bytes>> {
    match serve(request, state, peer).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn serve(
    request: Request<Incoming>,
    state: &EdgeState,
    peer: IpAddr,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let now = Instant::now();
    // Requests per address and minute, as a failure limiter counts.
    let address = LimitKey::Address(peer);
    if state.api_requests.is_blocked(&address, now) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests from this address; try again in a minute",
        ));
    }
    state
        .api_requests
        .record_failure(std::slice::from_ref(&address), now);
    let (operation, parameters) = match route(request.method(), request.uri().path()) {
        Ok(found) => found,
        Err(true) => {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            ));
        }
        Err(false) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route",
            ));
        }
    };
    if operation.is_public() {
        return Ok(json_response(StatusCode::OK, &openapi_document()));
    }
    let (parts, body) = request.into_parts();
    let caller = caller(&parts.headers, state, peer, operation).await?;
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request bodies are at most {MAX_BODY_BYTES} bytes"),
            ));
        }
        Err(_) => return Err(ApiError::bad_request("the request body could not be read")),
    };
    let context = Call {
        state,
        caller: &caller.caller,
        session: caller
            .csrf_token
            .is_some()
            .then(|| cookie(&parts.headers, SESSION_COOKIE))
            .flatten(),
        csrf_token: caller.csrf_token.as_deref(),
        address: peer.to_string(),
    };
    context.run(operation, &parameters, &body).await
}

/// An authenticated caller, and (for a console session) its CSRF token.
struct Authenticated {
    caller: AdminCaller,
    csrf_token: Option<String>,
}

/// The console session's CSRF token: derived from its cookie value, which
/// another site can neither read nor guess (the signed double-submit
/// pattern; nothing to store).
pub fn csrf_token_for(session: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("relay-csrf:{session}").as_bytes(),
    );
    digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

pub use crate::form::{constant_time_eq, cookie};

async fn caller(
    headers: &hyper::HeaderMap,
    state: &EdgeState,
    peer: IpAddr,
    operation: Operation,
) -> Result<Authenticated, ApiError> {
    let now = Instant::now();
    let keys = vec![LimitKey::Address(peer)];
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    let session = cookie(headers, SESSION_COOKIE);
    if bearer.is_none() && session.is_none() {
        return Err(ApiError::unauthorized());
    }
    let Some(attempt) = state.failures.begin(keys, now) else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many failed sign-ins from this address; try again in a minute",
        ));
    };
    let store = state.authenticator.store();
    let (verified, csrf_token) = match (bearer, session) {
        (Some(token), _) => (store.verify_admin_token(token).await, None),
        (None, Some(session)) => (
            store.verify_admin_session(session).await,
            Some(csrf_token_for(session)),
        ),
        (None, None) => return Err(ApiError::unauthorized()),
    };
    let caller = match verified? {
        Ok(caller) => caller,
        Err(failure) => {
            attempt.failed();
            let message = match failure {
                AdminAuthFailure::Expired => "the session has expired: sign in again",
                AdminAuthFailure::Revoked => "the session or token was ended",
                _ => "sign in with a login link, or send a tenant API token",
            };
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                message,
            ));
        }
    };
    drop(attempt);
    if let Some(expected) = &csrf_token
        && operation.changes()
    {
        let given = headers
            .get(CSRF_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "a change from a console session needs its X-CSRF-Token (GET /api/v1/session)",
            ));
        }
    }
    Ok(Authenticated { caller, csrf_token })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDevice {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    #[serde(default)]
    label: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairingAnswer {
    code: String,
    device_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    #[serde(default)]
    label: String,
    scope: String,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    expires_in_seconds: Option<u64>,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        ApiError::bad_request(format!("the body is not the expected JSON: {error}"))
    })
}

/// One authenticated request.
struct Call<'a> {
    state: &'a EdgeState,
    caller: &'a AdminCaller,
    /// The console session's cookie value, for a session caller.
    session: Option<&'a str>,
    csrf_token: Option<&'a str>,
    address: String,
}

impl Call<'_> {
    async fn run(
        &self,
        operation: Operation,
        parameters: &[String],
        body: &Bytes,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let store = self.state.authenticator.store();
        let tenant = self.caller.tenant_id.as_str();
        let parameter = || parameters.first().map(String::as_str).unwrap_or_default();
        match operation {
            Operation::GetSession => Ok(json_response(
                StatusCode::OK,
                &json!({
                    "tenant_id": tenant,
                    "actor": self.caller.actor,
                    "csrf_token": self.csrf_token,
                }),
            )),
            Operation::EndSession => {
                if let Some(session) = self.session {
                    store.revoke_admin_session(session).await?;
                }
                self.audit("session.end", &self.caller.actor, "").await?;
                let mut response = no_content();
                response.headers_mut().insert(
                    header::SET_COOKIE,
                    HeaderValue::from_static(
                        "relay_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
                    ),
                );
                Ok(response)
            }
            Operation::ListDevices => {
                let devices = store.list_devices(Some(tenant)).await?;
                let out = devices_json(self.state, &devices).await?;
                Ok(json_response(StatusCode::OK, &Value::Array(out)))
            }
            Operation::CreateDevice => {
                let new: NewDevice = parse(body)?;
                let device = self.changes().create_device(&new.name).await?;
                Ok(json_response(
                    StatusCode::CREATED,
                    &device_json(self.state, &device).await?,
                ))
            }
            Operation::GetDevice => {
                let device = store.tenant_device(tenant, parameter()).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &device_json(self.state, &device).await?,
                ))
            }
            Operation::RenameDevice => {
                let new: NewDevice = parse(body)?;
                let device = store.rename_device(tenant, parameter(), &new.name).await?;
                self.audit(
                    "device.rename",
                    &device.id,
                    &format!("name {:?}", device.name),
                )
                .await?;
                Ok(json_response(
                    StatusCode::OK,
                    &device_json(self.state, &device).await?,
                ))
            }
            Operation::DeleteDevice => {
                let device = store.tenant_device(tenant, parameter()).await?;
                store.delete_device(&device.id).await?;
                self.state
                    .end_sessions(|session| session.device_id == device.id, &Close::revoked());
                self.audit("device.delete", &device.id, "").await?;
                Ok(no_content())
            }
            Operation::ListKeys => {
                let keys = store.list_api_keys(Some(tenant)).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &serde_json::to_value(keys).unwrap_or_default(),
                ))
            }
            Operation::CreateKey => {
                let new: NewKey = parse(body)?;
                let scope = Scope::parse(&new.scope).ok_or_else(|| {
                    ApiError::bad_request("scope must be \"read\" or \"control\"")
                })?;
                let expires_at = match new.expires_in_seconds {
                    None => None,
                    Some(0) => {
                        return Err(ApiError::bad_request(
                            "expires_in_seconds must be at least 1",
                        ));
                    }
                    Some(seconds) => {
                        let millis = i64::try_from(seconds.saturating_mul(1000)).map_err(|_| {
                            ApiError::bad_request("expires_in_seconds is too large")
                        })?;
                        Some(store.now().saturating_add(millis))
                    }
                };
                let (key, credential) = self
                    .changes()
                    .create_key(&new.label, scope, new.device_id.as_deref(), expires_at)
                    .await?;
                Ok(json_response(
                    StatusCode::CREATED,
                    &json!({ "key": key, "token": credential.reveal() }),
                ))
            }
            Operation::RevokeKey => {
                self.changes().revoke_key(parameter()).await?;
                Ok(no_content())
            }
            Operation::IssueAgentCredential => {
                let (device, credential, issued) =
                    self.changes().issue_agent_credential(parameter()).await?;
                Ok(json_response(
                    StatusCode::CREATED,
                    &json!({
                        "credential": { "id": credential.id, "created_at": credential.created_at },
                        "device_id": device.id,
                        "token": issued.reveal(),
                    }),
                ))
            }
            Operation::RevokeAgentCredential => {
                self.changes().revoke_agent_credential(parameter()).await?;
                Ok(no_content())
            }
            Operation::ListTokens => {
                let tokens = store.list_admin_tokens(tenant).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &serde_json::to_value(tokens).unwrap_or_default(),
                ))
            }
            Operation::CreateToken => {
                let new: NewToken = parse(body)?;
                let (token, issued) = store.create_admin_token(tenant, &new.label).await?;
                self.audit(
                    "token.create",
                    &token.id,
                    &format!("label {:?}", token.label),
                )
                .await?;
                Ok(json_response(
                    StatusCode::CREATED,
                    &json!({ "token": token, "secret": issued.reveal() }),
                ))
            }
            Operation::RevokeToken => {
                store.revoke_admin_token(tenant, parameter()).await?;
                self.audit("token.revoke", parameter(), "").await?;
                Ok(no_content())
            }
            Operation::ApprovePairing | Operation::DenyPairing => {
                let decision: PairingAnswer = parse(body)?;
                let approve = operation == Operation::ApprovePairing;
                let device_id = match (approve, decision.device_id) {
                    (true, Some(device_id)) => Some(device_id),
                    (true, None) => return Err(ApiError::bad_request("device_id is required")),
                    (false, _) => None,
                };
                let (pairing, device) = self
                    .changes()
                    .decide_pairing(&decision.code, device_id.as_deref())
                    .await?;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "pairing": pairing,
                        "decision": if approve { "approved" } else { "denied" },
                        "device_id": device,
                    }),
                ))
            }
            Operation::ListAudit => {
                let entries = store.audit_log(tenant, AUDIT_PAGE).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &serde_json::to_value(entries).unwrap_or_default(),
                ))
            }
            Operation::OpenApi => Ok(json_response(StatusCode::OK, &openapi_document())),
        }
    }

    fn changes(&self) -> TenantChanges<'_> {
        TenantChanges {
            state: self.state,
            caller: self.caller,
            address: &self.address,
        }
    }

    async fn audit(&self, action: &str, target: &str, detail: &str) -> Result<(), ApiError> {
        self.changes().audit(action, target, detail).await
    }
}

/// The changes a tenant's admin makes, each recorded in the audit log:
/// what the API's routes and the console's forms both do.
#[derive(Debug)]
pub struct TenantChanges<'a> {
    pub state: &'a EdgeState,
    pub caller: &'a AdminCaller,
    /// Where the change came from, for the audit log.
    pub address: &'a str,
}

impl TenantChanges<'_> {
    fn tenant(&self) -> &str {
        &self.caller.tenant_id
    }

    pub async fn audit(&self, action: &str, target: &str, detail: &str) -> Result<(), ApiError> {
        self.state
            .authenticator
            .store()
            .record_audit(
                self.tenant(),
                AuditRecord {
                    actor: &self.caller.actor,
                    action,
                    target,
                    address: self.address,
                    detail,
                },
            )
            .await?;
        Ok(())
    }

    pub async fn create_device(&self, name: &str) -> Result<relay_store::Device, ApiError> {
        let device = self
            .state
            .authenticator
            .store()
            .create_device(self.tenant(), name)
            .await?;
        self.audit(
            "device.create",
            &device.id,
            &format!("name {:?}", device.name),
        )
        .await?;
        Ok(device)
    }

    /// A new app key; bound to `device_id` when given, which must be the
    /// tenant's.
    pub async fn create_key(
        &self,
        label: &str,
        scope: Scope,
        device_id: Option<&str>,
        expires_at: Option<relay_store::Millis>,
    ) -> Result<(relay_store::ApiKey, IssuedCredential), ApiError> {
        let store = self.state.authenticator.store();
        if let Some(device_id) = device_id {
            store.tenant_device(self.tenant(), device_id).await?;
        }
        let (key, credential) = store
            .create_api_key(NewApiKey {
                tenant_id: self.tenant(),
                device_id,
                scope,
                label,
                expires_at,
            })
            .await?;
        self.audit(
            "key.create",
            &key.id,
            &format!(
                "scope {}, device {}, label {:?}",
                key.scope.as_str(),
                key.device_id.as_deref().unwrap_or("any"),
                key.label
            ),
        )
        .await?;
        Ok((key, credential))
    }

    /// Revokes one of the tenant's keys; its live sessions here end now.
    pub async fn revoke_key(&self, key_id: &str) -> Result<(), ApiError> {
        self.state
            .authenticator
            .store()
            .revoke_tenant_api_key(self.tenant(), key_id)
            .await?;
        self.state
            .end_sessions(|session| session.key_id == key_id, &Close::revoked());
        self.audit("key.revoke", key_id, "").await
    }

    /// Issues the device's agent credential, or rotates it when it has one.
    pub async fn issue_agent_credential(
        &self,
        device_id: &str,
    ) -> Result<(relay_store::Device, AgentCredential, IssuedCredential), ApiError> {
        let store = self.state.authenticator.store();
        let device = store.tenant_device(self.tenant(), device_id).await?;
        let rotate = store.agent_credential_of(&device.id).await?.is_some();
        let (credential, issued) = if rotate {
            store.rotate_agent_credential(&device.id).await?
        } else {
            store.issue_agent_credential(&device.id).await?
        };
        let action = if rotate {
            "agent_credential.rotate"
        } else {
            "agent_credential.issue"
        };
        self.audit(action, &device.id, &format!("credential {}", credential.id))
            .await?;
        Ok((device, credential, issued))
    }

    /// Approves (for `device_id`, one of the tenant's) or denies the
    /// pairing whose code an owner typed, within the guess limits; the
    /// pairing's id and the device.
    pub async fn decide_pairing(
        &self,
        code: &str,
        device_id: Option<&str>,
    ) -> Result<(String, Option<String>), ApiError> {
        use crate::pairing::CodeEntry;
        use relay_store::pairing::PairingDecision;
        let peer: IpAddr = self.address.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let tenant = self.tenant().to_owned();
        let pending = match crate::pairing::enter_code(self.state, &tenant, peer, code).await? {
            CodeEntry::Found(pending) => pending,
            CodeEntry::NotFound => {
                return Err(ApiError::not_found(
                    "no agent is waiting with this code (wrong, expired or decided)",
                ));
            }
            CodeEntry::Limited(_) => {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many wrong codes; try again in a minute",
                ));
            }
        };
        let store = self.state.authenticator.store();
        let (decision, device, action) = match device_id {
            Some(device_id) => {
                let device = store.tenant_device(&tenant, device_id).await?;
                (
                    PairingDecision::Approve {
                        tenant_id: tenant.clone(),
                        device_id: device.id.clone(),
                    },
                    Some(device.id),
                    "pairing.approve",
                )
            }
            None => (
                PairingDecision::Deny {
                    tenant_id: tenant.clone(),
                },
                None,
                "pairing.deny",
            ),
        };
        if !crate::pairing::decide(self.state, &pending.id, &decision).await? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "the pairing was decided or expired meanwhile",
            ));
        }
        self.audit(
            action,
            device.as_deref().unwrap_or("-"),
            &format!("pairing {}", pending.id),
        )
        .await?;
        Ok((pending.id, device))
    }

    /// Revokes the agent credential of one of the tenant's devices: its
    /// agent is disconnected at once.
    pub async fn revoke_agent_credential(&self, device_id: &str) -> Result<(), ApiError> {
        let store = self.state.authenticator.store();
        let device = store.tenant_device(self.tenant(), device_id).await?;
        let Some(current) = store.agent_credential_of(&device.id).await? else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "the device has no agent credential",
            ));
        };
        store.revoke_agent_credential(&device.id).await?;
        self.state.devices.end_revoked(&current.id);
        self.audit(
            "agent_credential.revoke",
            &device.id,
            &format!("credential {}", current.id),
        )
        .await
    }
}

/// A device and its status: from the store's registry (which instance
/// holds its agent, since when) and printer status, and the live figures
/// of every instance ([`crate::live_status`]).
pub async fn device_json(
    state: &EdgeState,
    device: &relay_store::Device,
) -> Result<Value, ApiError> {
    let mut devices = devices_json(state, std::slice::from_ref(device)).await?;
    Ok(devices.pop().unwrap_or_default())
}

/// [`device_json`] of several devices of one tenant, with one question to
/// each instance.
pub async fn devices_json(
    state: &EdgeState,
    devices: &[relay_store::Device],
) -> Result<Vec<Value>, ApiError> {
    let store = state.authenticator.store();
    let ids: Vec<String> = devices.iter().map(|device| device.id.clone()).collect();
    let gathered = crate::live_status::gather(state, &ids).await;
    let any_apps = gathered
        .figures
        .values()
        .any(|figures| !figures.apps.is_empty());
    let labels: std::collections::HashMap<String, String> = match devices.first() {
        Some(device) if any_apps => store
            .list_api_keys(Some(&device.tenant_id))
            .await?
            .into_iter()
            .map(|key| (key.id, key.label))
            .collect(),
        _ => std::collections::HashMap::new(),
    };
    let now = store.now();
    let mut out = Vec::with_capacity(devices.len());
    for device in devices {
        let claim = store.device_claim(&device.id).await?;
        let online = claim.as_ref().is_some_and(|claim| claim.is_live(now));
        let printer = store.printer_status(&device.id).await?;
        let agent_credential = store.agent_credential_of(&device.id).await?;
        let figures = gathered.of(&device.id);
        let apps: Vec<Value> = figures
            .apps
            .iter()
            .map(|app| {
                json!({
                    "client_id": app.client_id,
                    "mqtt_version": app.mqtt_version,
                    "transport": app.transport,
                    "address": app.address.to_string(),
                    "since": app.since,
                    "key_id": app.key_id,
                    "key_label": labels.get(&app.key_id),
                    "instance": app.instance,
                })
            })
            .collect();
        out.push(json!({
            "id": device.id,
            "name": device.name,
            "created_at": device.created_at,
            "agent_credential": agent_credential,
            "status": {
                "online": online,
                "instance": claim.as_ref().filter(|_| online).map(|claim| claim.instance_id.clone()),
                "connected_since": claim.as_ref().filter(|_| online).map(|claim| claim.connected_at),
                "agent": figures.agent.as_ref().filter(|_| online),
                "printer": printer,
                "apps_connected": figures.apps_connected(),
                "apps": apps,
                "traffic": figures.traffic.as_ref().filter(|_| online),
                "instances_unanswered": gathered.unanswered,
            },
        }));
    }
    Ok(out)
}

/// The OpenAPI 3.1 document of [`Operation::ALL`].
pub fn openapi_document() -> Value {
    let mut paths = serde_json::Map::new();
    for operation in Operation::ALL {
        let (method, path, id, summary) = operation.describe();
        let mut responses = serde_json::Map::new();
        let (status, body) = operation.success();
        let mut success = json!({ "description": status.canonical_reason().unwrap_or("success") });
        if let Some(schema) = body {
            success["content"] = json!({ "application/json": { "schema": schema } });
        }
        responses.insert(status.as_u16().to_string(), success);
        let error = |description: &str| {
            json!({
                "description": description,
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } },
            })
        };
        if !operation.is_public() {
            responses.insert(
                "401".into(),
                error("No session or token, or an expired one"),
            );
            responses.insert("429".into(), error("Too many requests or failed sign-ins"));
        }
        if operation.changes() {
            responses.insert("400".into(), error("Bad input; nothing changed"));
            responses.insert(
                "403".into(),
                error("A console session's change without its X-CSRF-Token"),
            );
        }
        if path.contains('{') {
            responses.insert("404".into(), error("Not this tenant's, or unknown"));
        }
        let mut entry = json!({
            "operationId": id,
            "summary": summary,
            "responses": responses,
        });
        if operation.is_public() {
            entry["security"] = json!([]);
        }
        let parameters: Vec<Value> = path
            .split('/')
            .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        if !parameters.is_empty() {
            entry["parameters"] = Value::Array(parameters);
        }
        if let Some(schema) = operation.request_schema() {
            entry["requestBody"] = json!({
                "required": true,
                "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } },
            });
        }
        let item = paths.entry(path.to_owned()).or_insert_with(|| json!({}));
        item[method.as_str().to_ascii_lowercase()] = entry;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "relay tenant API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "A tenant's devices, app keys, agent credentials and audit log. Another tenant's ids answer 404, as unknown ones.",
        },
        "servers": [{ "url": "/" }],
        "security": [{ "token": [] }, { "session": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "token": { "type": "http", "scheme": "bearer", "description": "A tenant API token, rlt_…" },
                "session": { "type": "apiKey", "in": "cookie", "name": SESSION_COOKIE, "description": "A console session from a login link; changes carry X-CSRF-Token" },
            },
            "schemas": schemas(),
        },
    })
}

fn schemas() -> Value {
    let millis = json!({ "type": "integer", "description": "milliseconds since the Unix epoch" });
    let optional_millis = json!({ "type": ["integer", "null"] });
    let optional_string = json!({ "type": ["string", "null"] });
    json!({
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": { "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": { "code": { "type": "string" }, "message": { "type": "string" } },
            } },
        },
        "Session": {
            "type": "object",
            "required": ["tenant_id", "actor"],
            "properties": {
                "tenant_id": { "type": "string" },
                "actor": { "type": "string" },
                "csrf_token": optional_string,
            },
        },
        "NewDevice": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": false,
            "properties": { "name": { "type": "string", "minLength": 1, "maxLength": 128 } },
        },
        "Rename": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": false,
            "properties": { "name": { "type": "string", "minLength": 1, "maxLength": 128 } },
        },
        "Device": {
            "type": "object",
            "required": ["id", "name", "created_at", "status"],
            "properties": {
                "id": { "type": "string" },
                "name": { "type": "string" },
                "created_at": millis,
                "agent_credential": {
                    "type": ["object", "null"],
                    "properties": { "id": { "type": "string" }, "created_at": millis },
                },
                "status": {
                    "type": "object",
                    "properties": {
                        "online": { "type": "boolean" },
                        "instance": optional_string,
                        "connected_since": optional_millis,
                        "agent": {
                            "type": ["object", "null"],
                            "description": "The agent, from the instance that holds it",
                            "properties": {
                                "version": optional_string,
                                "transport": { "type": "string", "enum": ["quic", "tcp"] },
                                "connected_since": millis,
                                "instance": { "type": "string" },
                            },
                        },
                        "printer": { "type": ["object", "null"] },
                        "apps_connected": {
                            "type": "integer",
                            "description": "On every instance that answered",
                        },
                        "apps": { "type": "array", "items": { "$ref": "#/components/schemas/App" } },
                        "traffic": {
                            "type": ["object", "null"],
                            "description": "PUBLISHes through the device's hub on the agent's instance, and the printer it reaches; null while no app (or message view) has the printer's link open",
                            "properties": {
                                "printer_kind": { "type": ["string", "null"], "enum": ["bambu", "elegoo_cc2", "mqtt", "other", null] },
                                "printer_serial": optional_string,
                                "from_printer_last_minute": { "type": "integer" },
                                "to_printer_last_minute": { "type": "integer" },
                                "last_printer_message_at": optional_millis,
                            },
                        },
                        "instances_unanswered": {
                            "type": "array",
                            "description": "Live instances that did not answer in time: their apps are missing",
                            "items": { "type": "string" },
                        },
                    },
                },
            },
        },
        "Token": {
            "type": "object",
            "properties": {
                "id": { "type": "string" },
                "tenant_id": { "type": "string" },
                "label": { "type": "string" },
                "created_at": millis,
                "last_used_at": optional_millis,
                "revoked_at": optional_millis,
            },
        },
        "NewToken": {
            "type": "object",
            "additionalProperties": false,
            "properties": { "label": { "type": "string", "maxLength": 128 } },
        },
        "CreatedToken": {
            "type": "object",
            "required": ["token", "secret"],
            "properties": {
                "token": { "$ref": "#/components/schemas/Token" },
                "secret": { "type": "string", "description": "rlt_…, shown once" },
            },
        },
        "PairingApproval": {
            "type": "object",
            "required": ["code", "device_id"],
            "additionalProperties": false,
            "properties": {
                "code": { "type": "string", "description": "The code the agent shows, XXXX-XXXX (case, spaces and dashes do not matter)" },
                "device_id": { "type": "string" },
            },
        },
        "PairingDenial": {
            "type": "object",
            "required": ["code"],
            "additionalProperties": false,
            "properties": { "code": { "type": "string" } },
        },
        "PairingDecided": {
            "type": "object",
            "properties": {
                "pairing": { "type": "string" },
                "decision": { "type": "string", "enum": ["approved", "denied"] },
                "device_id": optional_string,
            },
        },
        "App": {
            "type": "object",
            "description": "An app's session",
            "properties": {
                "client_id": { "type": "string" },
                "mqtt_version": { "type": "string", "enum": ["3.1", "3.1.1", "5"] },
                "transport": { "type": "string", "enum": ["wss", "mqtts", "mqtt"] },
                "address": { "type": "string" },
                "since": millis,
                "key_id": { "type": "string" },
                "key_label": optional_string,
                "instance": { "type": "string" },
            },
        },
        "NewKey": {
            "type": "object",
            "required": ["scope"],
            "additionalProperties": false,
            "properties": {
                "label": { "type": "string", "maxLength": 128 },
                "scope": { "type": "string", "enum": ["read", "control"] },
                "device_id": optional_string,
                "expires_in_seconds": { "type": ["integer", "null"], "minimum": 1 },
            },
        },
        "Key": {
            "type": "object",
            "required": ["id", "scope", "label", "created_at"],
            "properties": {
                "id": { "type": "string" },
                "tenant_id": { "type": "string" },
                "device_id": optional_string,
                "scope": { "type": "string", "enum": ["read", "control"] },
                "label": { "type": "string" },
                "created_at": millis,
                "expires_at": optional_millis,
                "last_used_at": optional_millis,
                "revoked_at": optional_millis,
            },
        },
        "CreatedKey": {
            "type": "object",
            "required": ["key", "token"],
            "properties": {
                "key": { "$ref": "#/components/schemas/Key" },
                "token": { "type": "string", "description": "shown once" },
            },
        },
        "CreatedAgentCredential": {
            "type": "object",
            "required": ["credential", "device_id", "token"],
            "properties": {
                "credential": { "type": "object", "properties": { "id": { "type": "string" }, "created_at": millis } },
                "device_id": { "type": "string" },
                "token": { "type": "string", "description": "shown once" },
            },
        },
        "AuditEntry": {
            "type": "object",
            "required": ["id", "at", "actor", "action", "target", "address", "detail"],
            "properties": {
                "id": { "type": "string" },
                "at": millis,
                "actor": { "type": "string" },
                "action": { "type": "string" },
                "target": { "type": "string" },
                "address": { "type": "string" },
                "detail": { "type": "string" },
            },
        },
    })
}

/// The login page a login link opens: one button that posts the token
/// (a GET never signs in, so link scanners do not use up the link).
pub fn login_page(token: &str) -> Response<Full<Bytes>> {
    let token: String = token
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(128)
        .collect();
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Sign in to relay</title></head><body>\
         <form method=\"post\" action=\"/login\">\
         <input type=\"hidden\" name=\"token\" value=\"{token}\">\
         <button type=\"submit\">Sign in</button></form></body></html>"
    );
    let mut response = Response::new(Full::new(Bytes::from(html)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// `POST /login` (form `token=rll_…`): redeems the link for a console
/// session cookie and sends the browser on.
pub async fn login(
    request: Request<Incoming>,
    state: &Arc<EdgeState>,
    peer: IpAddr,
) -> Response<Full<Bytes>> {
    let now = Instant::now();
    let Some(attempt) = state.failures.begin(vec![LimitKey::Address(peer)], now) else {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many failed sign-ins from this address; try again in a minute",
        )
        .into_response();
    };
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return ApiError::bad_request("the form could not be read").into_response(),
    };
    let token = String::from_utf8_lossy(&body)
        .split('&')
        .find_map(|pair| pair.strip_prefix("token=").map(str::to_owned))
        .unwrap_or_default();
    let store = state.authenticator.store();
    let opened = match store.redeem_login_link(&token).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(failure)) => {
            attempt.failed();
            let message = match failure {
                AdminAuthFailure::Expired => "this login link has expired: ask for a new one",
                AdminAuthFailure::Used => "this login link was used already: ask for a new one",
                _ => "this is not a valid login link",
            };
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
                .into_response();
        }
        Err(error) => return ApiError::from(error).into_response(),
    };
    drop(attempt);
    signed_in(state, &opened, peer, "login link", "/").await
}

/// Audits a new console session and answers with its cookie, sending the
/// browser on to `then`.
async fn signed_in(
    state: &EdgeState,
    opened: &relay_store::admin::OpenedSession,
    peer: IpAddr,
    how: &str,
    then: &str,
) -> Response<Full<Bytes>> {
    let store = state.authenticator.store();
    let actor = format!("session:{}", opened.credential.id);
    if let Err(error) = store
        .record_audit(
            &opened.tenant_id,
            AuditRecord {
                actor: &actor,
                action: "session.start",
                target: &opened.tenant_id,
                address: &peer.to_string(),
                detail: how,
            },
        )
        .await
    {
        return ApiError::from(error).into_response();
    }
    let max_age = (opened.expires_at - store.now()) / 1000;
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age}",
        opened.credential.reveal()
    );
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(then) {
        headers.insert(header::LOCATION, value);
    }
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        headers.insert(header::SET_COOKIE, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /login/oidc`: to the operator's identity provider.
pub async fn oidc_login(request: &Request<Incoming>, state: &EdgeState) -> Response<Full<Bytes>> {
    let Some(oidc) = &state.oidc else {
        return ApiError::not_found("sign-in with an identity provider is not set up here")
            .into_response();
    };
    let host = host_of(request, state);
    let query = crate::form::parse_form(request.uri().query().unwrap_or_default());
    let next = query.get("next").map_or("/", String::as_str);
    match oidc.start(&host, next).await {
        Ok(response) => response,
        Err(failure) => oidc_failed(state, &failure),
    }
}

/// `GET /login/oidc/callback`: the provider's answer; a console session
/// for the tenant the ID token names.
pub async fn oidc_callback(
    request: &Request<Incoming>,
    state: &EdgeState,
    peer: IpAddr,
) -> Response<Full<Bytes>> {
    let Some(oidc) = &state.oidc else {
        return ApiError::not_found("sign-in with an identity provider is not set up here")
            .into_response();
    };
    let now = Instant::now();
    let address = LimitKey::Address(peer);
    let Some(attempt) = state.failures.begin(vec![address], now) else {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many failed sign-ins from this address; try again in a minute",
        )
        .into_response();
    };
    let host = host_of(request, state);
    let query = crate::form::parse_form(request.uri().query().unwrap_or_default());
    let flow = crate::oidc::flow_cookie(request.headers());
    let signed = match oidc.finish(&host, &query, flow).await {
        Ok(signed) => signed,
        Err(failure) => {
            attempt.failed();
            return oidc_failed(state, &failure);
        }
    };
    let store = state.authenticator.store();
    let tenant = match store.tenant(&signed.tenant).await {
        Ok(tenant) => tenant,
        Err(_) => {
            attempt.failed();
            return oidc_failed(
                state,
                &crate::oidc::SignInFailure {
                    label: "unknown_tenant",
                    message:
                        "your account names a tenant this relay does not have: ask your operator"
                            .into(),
                },
            );
        }
    };
    drop(attempt);
    let opened = match store.open_admin_session(&tenant.id).await {
        Ok(opened) => opened,
        Err(error) => return ApiError::from(error).into_response(),
    };
    tracing::info!(tenant = %tenant.id, "signed in with the identity provider");
    // A page, not a redirect: the session cookie is SameSite=Strict, and a
    // redirect chain that began at the provider is cross-site, so the
    // browser would not send it to "/" yet.
    let mut response = signed_in(
        state,
        &opened,
        peer,
        &format!("identity provider, subject {}", signed.subject),
        "/",
    )
    .await;
    if response.status() == StatusCode::SEE_OTHER {
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.remove(header::LOCATION);
        headers.append(
            header::SET_COOKIE,
            HeaderValue::from_static(crate::oidc::CLEAR_FLOW_COOKIE),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        let next = crate::form::escape(&signed.next);
        *response.body_mut() = Full::new(Bytes::from(format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url={next}\"><title>Signed in</title></head><body><p>Signed in. <a href=\"{next}\">Go on</a></p></body></html>"
        )));
    }
    response
}

fn host_of(request: &Request<Incoming>, state: &EdgeState) -> String {
    request
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or(&state.config.public.base_domain)
        .to_owned()
}

fn oidc_failed(state: &EdgeState, failure: &crate::oidc::SignInFailure) -> Response<Full<Bytes>> {
    state.count_auth_failure(&format!("oidc_{}", failure.label));
    tracing::info!(
        reason = failure.label,
        "sign-in with the identity provider failed"
    );
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        failure.message.clone(),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_is_routed_by_its_own_method_and_path() {
        for operation in Operation::ALL {
            let path = operation
                .path()
                .replace("{device_id}", "abc")
                .replace("{key_id}", "k1");
            let (found, _) = route(&operation.method(), &path).unwrap();
            assert_eq!(found, operation, "{path}");
        }
        assert!(route(&Method::PUT, "/api/v1/devices").unwrap_err());
        assert!(!route(&Method::GET, "/api/v1/nothing").unwrap_err());
        assert!(!route(&Method::GET, "/api/v1/devices/").unwrap_err());
        assert!(!route(&Method::GET, "/api/v1/devices/a/b").unwrap_err());
    }

    #[test]
    fn the_document_names_every_route_and_nothing_else() {
        let document = openapi_document();
        let paths = document["paths"].as_object().unwrap();
        let mut named = 0;
        for (path, item) in paths {
            for (method, _) in item.as_object().unwrap() {
                let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
                assert!(
                    Operation::ALL
                        .iter()
                        .any(|operation| operation.path() == path && operation.method() == method),
                    "{method} {path}"
                );
                named += 1;
            }
        }
        assert_eq!(named, Operation::ALL.len());
    }

    #[test]
    fn the_csrf_token_is_derived_from_the_session_and_differs_per_session() {
        assert_eq!(csrf_token_for("a"), csrf_token_for("a"));
        assert_ne!(csrf_token_for("a"), csrf_token_for("b"));
        assert_eq!(csrf_token_for("a").len(), 64);
    }
}
