//! The web console at `https://<base domain>/`: server-rendered pages on
//! the tenant API's store operations, readable on a phone:
//!
//! - devices with live status (one small script: the status pushed over a
//!   WebSocket, `/console/live`, within about a second of a change);
//! - a device: its agent, apps on every instance, keys and recipes, and a
//!   live message view (`/console/messages/<device>`, paused until asked);
//! - keys, agent credentials, the audit log;
//! - pairing an agent by its code (`/pair`) and an app's consent page
//!   (`/authorize`).
//!
//! Signed in by a login link's session cookie, or with the operator's
//! OpenID provider; every form carries the session's CSRF token.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use relay_store::Scope;
use relay_store::admin::AdminCaller;
use serde_json::Value;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::state::EdgeState;
use crate::tenant_api::{
    ApiError, SESSION_COOKIE, TenantChanges, constant_time_eq, cookie, csrf_token_for, device_json,
    devices_json,
};

/// How often an open devices page's status is looked at.
const LIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Whether `path` is a console page (on the base domain).
pub fn is_console_path(path: &str) -> bool {
    path == "/"
        || path == "/logout"
        || path == "/keys"
        || path == "/audit"
        || path == "/agents"
        || path == "/pair"
        || path == "/authorize"
        || path == "/pair/decide"
        || path == "/console/live"
        || path.starts_with("/console/messages/")
        || path.starts_with("/devices")
        || path.starts_with("/keys/")
}

pub use crate::form::escape;

/// A signed-in visitor.
struct Visitor {
    caller: AdminCaller,
    /// The session's cookie value (to end it on sign-out).
    session: String,
    csrf: String,
    /// The host (and port) the console was reached at: the recipes' base.
    host: String,
}

async fn visitor(headers: &hyper::HeaderMap, state: &EdgeState) -> Option<Visitor> {
    let session = cookie(headers, SESSION_COOKIE)?;
    let caller = state
        .authenticator
        .store()
        .verify_admin_session(session)
        .await
        .ok()?
        .ok()?;
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or(&state.config.public.base_domain)
        .to_owned();
    Some(Visitor {
        caller,
        session: session.to_owned(),
        csrf: csrf_token_for(session),
        host,
    })
}

fn html(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    response
}

fn redirect(to: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(value) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#222}\
header{background:#1d3557;color:#fff;padding:.6em 1em;display:flex;flex-wrap:wrap;gap:1em;align-items:center}\
header a{color:#fff}header form{margin:0}main{padding:1em;max-width:60em}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.4em;border-bottom:1px solid #ddd;vertical-align:top}\
.scroll{overflow-x:auto}.badge{padding:.1em .5em;border-radius:1em;font-size:.9em;white-space:nowrap}\
.online{background:#2a9d8f;color:#fff}.offline{background:#aaa;color:#fff}.app{background:#457b9d;color:#fff}\
pre{background:#f4f4f4;padding:.6em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}\
input,select,button{font-size:1em;padding:.3em;margin:.2em 0}.secret{background:#ffe8a3;padding:.6em}\
code{word-break:break-all}.warning{color:#9d0208}form.inline{display:inline}\
.messages{list-style:none;padding:0;margin:0;max-height:30em;overflow-y:auto}\
.messages li{border-bottom:1px solid #ddd;padding:.3em 0}.messages pre{margin:.2em 0;max-height:8em;overflow-y:auto}";

/// A page with the console's header.
fn page(title: &str, visitor: Option<&Visitor>, content: &str) -> String {
    let nav = match visitor {
        Some(visitor) => format!(
            "<a href=\"/\">Devices</a><a href=\"/keys\">Keys</a><a href=\"/agents\">Agents</a><a href=\"/pair\">Pair an agent</a><a href=\"/audit\">Audit log</a>\
             <form method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\">Sign out</button></form>",
            visitor.csrf
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · relay</title><style>{STYLE}</style></head>\
         <body><header><strong>relay</strong>{nav}</header><main><h1>{title}</h1>{content}</main></body></html>",
        title = escape(title),
    )
}

fn signed_out(state: &EdgeState, wanted: &str) -> Response<Full<Bytes>> {
    // Back to the page asked for once signed in (a pairing code's link,
    // an app's request).
    let next = crate::app_consent::with_query("/login/oidc", &[("next", wanted)]);
    let provider = state.oidc.as_ref().map_or_else(String::new, |oidc| {
        format!(
            "<p><a class=\"button\" id=\"oidc-sign-in\" href=\"{}\">Sign in with {}</a></p>",
            escape(&next),
            escape(oidc.name())
        )
    });
    html(
        StatusCode::UNAUTHORIZED,
        page(
            "Sign in",
            None,
            &format!(
                "{provider}<p>Or open the login link your operator gave you (<code>relayctl tenant login-link</code>). \
                 A link works once, for 15 minutes.</p>"
            ),
        ),
    )
}

fn error_page(visitor: &Visitor, error: ApiError) -> Response<Full<Bytes>> {
    let (status, message) = error.parts();
    html(
        status,
        page(
            "Something went wrong",
            Some(visitor),
            &format!(
                "<p>{}</p><p><a href=\"/\">Back to the devices</a></p>",
                escape(message)
            ),
        ),
    )
}

/// Serves a console page.
pub async fn handle(
    request: Request<Incoming>,
    state: &Arc<EdgeState>,
    peer: IpAddr,
) -> Response<Full<Bytes>> {
    let Some(visitor) = visitor(request.headers(), state).await else {
        if request.uri().path().starts_with("/console/") {
            return html(StatusCode::UNAUTHORIZED, String::new());
        }
        let wanted = request
            .uri()
            .path_and_query()
            .map_or("/", |wanted| wanted.as_str())
            .to_owned();
        return signed_out(state, &wanted);
    };
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    if method == Method::GET && path == "/console/live" {
        return live(request, state, visitor.caller.tenant_id);
    }
    if method == Method::GET
        && let Some(device_id) = path.strip_prefix("/console/messages/")
    {
        return watch_messages(request, state, &visitor.caller.tenant_id, device_id).await;
    }
    let result = if method == Method::GET {
        match path.as_str() {
            "/" => devices_page(state, &visitor).await,
            "/keys" => keys_page(state, &visitor, None).await,
            "/audit" => audit_page(state, &visitor).await,
            "/agents" => agents_page(state, &visitor).await,
            "/authorize" => {
                let query = crate::form::parse_form(request.uri().query().unwrap_or_default());
                authorize_page(state, &visitor, &query).await
            }
            "/pair" => Ok(pair_page(
                &visitor,
                &query_value(request.uri().query().unwrap_or_default(), "code"),
                None,
            )),
            _ => match path.strip_prefix("/devices/") {
                Some(id) if !id.contains('/') => device_page(state, &visitor, id, None).await,
                _ => Err(ApiError::not_found("no such page")),
            },
        }
    } else if method == Method::POST {
        let form = match read_form(request).await {
            Ok(form) => form,
            Err(_) => {
                return error_page(
                    &visitor,
                    ApiError::bad_request_text("the form is too large or could not be read"),
                );
            }
        };
        if form
            .get("csrf")
            .is_none_or(|given| !constant_time_eq(given.as_bytes(), visitor.csrf.as_bytes()))
        {
            return error_page(
                &visitor,
                ApiError::forbidden_csrf(
                    "the form is stale or not from this console: reload the page",
                ),
            );
        }
        let call = Change {
            state,
            visitor: &visitor,
            address: peer.to_string(),
        };
        match path.as_str() {
            "/pair" => call.find_pairing(peer, &form).await,
            "/pair/decide" => call.decide_pairing(&form).await,
            "/authorize" => call.authorize(&form).await,
            _ => call.post(&path, &form).await,
        }
    } else {
        Err(ApiError::not_found("no such page"))
    };
    match result {
        Ok(response) => response,
        Err(error) => error_page(&visitor, error),
    }
}

use crate::form::{Form, read_form};

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS UTC` (the civil calendar
/// from a day count, as in Howard Hinnant's `civil_from_days`).
fn utc(millis: i64) -> String {
    let seconds = millis.div_euclid(1000);
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

fn badge(online: bool) -> &'static str {
    if online {
        "<span class=\"badge online\">online</span>"
    } else {
        "<span class=\"badge offline\">offline</span>"
    }
}

async fn devices_page(
    state: &EdgeState,
    visitor: &Visitor,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let store = state.authenticator.store();
    let devices = store.list_devices(Some(&visitor.caller.tenant_id)).await?;
    let statuses = devices_json(state, &devices).await?;
    let mut rows = String::new();
    for (device, status) in devices.iter().zip(&statuses) {
        let live = live_row(status);
        let _ = write!(
            rows,
            "<tr><td><a href=\"/devices/{id}\">{name}</a><br><code>{id}</code></td>\
             <td id=\"status-{id}\">{badge}</td><td id=\"transport-{id}\">{transport}</td>\
             <td id=\"printer-{id}\">{printer}</td><td id=\"apps-{id}\">{apps}</td></tr>",
            id = escape(&device.id),
            name = escape(&device.name),
            badge = badge(live["online"] == true),
            transport = escape(live["transport"].as_str().unwrap_or("")),
            printer = escape(live["printer"].as_str().unwrap_or("unknown")),
            apps = live["apps"],
        );
    }
    let content = format!(
        "<div class=\"scroll\"><table><thead><tr><th>Device</th><th>Agent</th><th>Tunnel</th><th>Printer</th><th>Apps</th></tr></thead>\
         <tbody>{rows}</tbody></table></div>\
         <h2>Add a device</h2><form method=\"post\" action=\"/devices\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>Name <input name=\"name\" required maxlength=\"128\"></label> <button type=\"submit\">Add</button></form>\
         <script>\
         (function(){{var s=new WebSocket((location.protocol=='https:'?'wss://':'ws://')+location.host+'/console/live');\
         s.onmessage=function(e){{JSON.parse(e.data).forEach(function(d){{\
         var b=document.getElementById('status-'+d.id);if(b){{b.innerHTML='<span class=\"badge '+(d.online?'online':'offline')+'\">'+(d.online?'online':'offline')+'</span>';}}\
         var t=function(k,v){{var e=document.getElementById(k+'-'+d.id);if(e){{e.textContent=v;}}}};\
         t('printer',d.printer);t('transport',d.transport);t('apps',d.apps);}});\
         document.body.setAttribute('data-live','1');}};}})();</script>",
        csrf = visitor.csrf,
    );
    Ok(html(
        StatusCode::OK,
        page("Devices", Some(visitor), &content),
    ))
}

/// The copy-paste recipes for one device and key, values filled in:
/// wss on the host (and port) the console was reached at, mqtts on that
/// host name and the edge's mqtts port.
fn recipes(host: &str, mqtts_port: u16, device: &str, key: &str) -> String {
    let url = format!("wss://{device}.{host}/mqtt");
    let (host_name, wss_port) = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => (name, port),
        _ => (host, "443"),
    };
    let mqtts = format!("{device}.{host_name}");
    let items = [
        (
            "MQTT.js",
            format!(
                "import mqtt from 'mqtt';\nconst client = mqtt.connect('{url}', {{ username: 'bblp', password: '{key}' }});\nclient.on('connect', () => client.subscribe('device/+/report'));\nclient.on('message', (topic, payload) => console.log(topic, payload.length));"
            ),
        ),
        (
            "paho-mqtt (Python)",
            format!(
                "import paho.mqtt.client as mqtt\nc = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, transport='websockets')\nc.ws_set_options(path='/mqtt')\nc.tls_set()\nc.username_pw_set('bblp', '{key}')\nc.on_connect = lambda c, u, f, r, p: c.subscribe('device/+/report')\nc.on_message = lambda c, u, m: print(m.topic)\nc.connect('{mqtts}', {wss_port})\nc.loop_forever()"
            ),
        ),
        (
            "mosquitto_sub",
            format!(
                "mosquitto_sub -h {mqtts} -p {mqtts_port} --capath /etc/ssl/certs -u bblp -P '{key}' -t 'device/+/report' -C 1 -v"
            ),
        ),
        (
            "MQTTX",
            format!(
                "Host: wss://{mqtts}, port {wss_port}, path /mqtt, SSL on\nUsername: bblp, password: {key}"
            ),
        ),
        (
            "Home Assistant (Bambu Lab integration, mqtts)",
            format!("Host: {mqtts} (port {mqtts_port}), access code: {key}"),
        ),
    ];
    let mut out = String::new();
    for (name, code) in items {
        let _ = write!(out, "<h3>{}</h3><pre>{}</pre>", escape(name), escape(&code));
    }
    out
}

/// The live message view: paused until the owner presses Watch, then
/// the newest 50 messages (payloads as text, never as markup).
fn message_view(device_id: &str) -> String {
    // A device id is a DNS label: safe in a URL path and in a script
    // string; escaped all the same.
    format!(
        "<h2>Live messages</h2>\
         <p>The printer's topics as an app sees them, read-only: at most {per_second} a second, \
         each cut to {bytes} bytes.</p>\
         <p><button type=\"button\" id=\"watch\">Watch</button> <span id=\"watch-state\">Paused</span></p>\
         <ol id=\"messages\" class=\"messages\"></ol>\
         <script>(function(){{var b=document.getElementById('watch'),st=document.getElementById('watch-state'),\
         list=document.getElementById('messages'),s=null;\
         function stop(text){{if(s){{s.onclose=null;s.close();s=null;}}b.textContent='Watch';st.textContent=text;}}\
         b.onclick=function(){{if(s){{stop('Paused');return;}}\
         s=new WebSocket((location.protocol=='https:'?'wss://':'ws://')+location.host+'/console/messages/{id}');\
         b.textContent='Pause';st.textContent='Connecting';\
         s.onclose=function(){{s=null;stop('Stopped');}};\
         s.onmessage=function(e){{var m=JSON.parse(e.data);\
         if(m.event=='watching'){{st.textContent='Watching';return;}}\
         if(m.event=='offline'){{stop('The device is offline');return;}}\
         if(m.event=='ended'){{stop('Ended: the device went away');return;}}\
         var li=document.createElement('li'),h=document.createElement('div'),p=document.createElement('pre');\
         h.textContent=new Date().toLocaleTimeString()+' '+m.topic+' ('+m.size+' bytes'+(m.cut?', cut':'')+\
         (m.skipped?', '+m.skipped+' skipped before':'')+')';\
         p.textContent=m.payload;li.appendChild(h);li.appendChild(p);list.insertBefore(li,list.firstChild);\
         while(list.children.length>50){{list.removeChild(list.lastChild);}}\
         document.body.setAttribute('data-messages',String(Number(document.body.getAttribute('data-messages')||0)+1));}};}};}})();</script>",
        per_second = WATCH_MESSAGES_PER_SECOND,
        bytes = WATCH_PAYLOAD_BYTES,
        id = escape(device_id),
    )
}

/// Why the printer is down or silent, if it is, in the agent's words.
fn failure(printer: &Value) -> String {
    match (printer["reason"].as_str(), printer["detail"].as_str()) {
        (Some(reason), Some(detail)) => escape(&format!("{reason}: {detail}")),
        (Some(reason), None) => escape(reason),
        (None, Some(detail)) => escape(detail),
        (None, None) => "-".to_owned(),
    }
}

/// A device's status and the apps connected to it, on every instance.
fn status_section(status: &Value, device_id: &str) -> String {
    let online = status["online"] == true;
    let text = |value: &Value| escape(value.as_str().unwrap_or("-"));
    let when = |value: &Value| value.as_i64().map_or_else(|| "-".to_owned(), utc);
    let agent = &status["agent"];
    let traffic = &status["traffic"];
    let mut out = String::new();
    let _ = write!(
        out,
        "<p>Device id <code>{id}</code></p><div class=\"scroll\"><table class=\"facts\">\
         <tr><th>Agent</th><td id=\"agent-state\">{badge}</td></tr>\
         <tr><th>Tunnel</th><td id=\"agent-transport\">{transport}</td></tr>\
         <tr><th>Agent version</th><td>{version}</td></tr>\
         <tr><th>Instance</th><td>{instance}</td></tr>\
         <tr><th>Connected since</th><td>{since}</td></tr>\
         <tr><th>Printer</th><td id=\"printer-state\">{printer}</td></tr>\
         <tr><th>Printer kind, serial</th><td>{kind}, {serial}</td></tr>\
         <tr><th>Last failure</th><td>{failure}</td></tr>\
         <tr><th>Messages, last minute</th><td>{from} from the printer, {to} to it</td></tr>\
         <tr><th>Last printer message</th><td>{last}</td></tr></table></div>",
        id = escape(device_id),
        badge = badge(online),
        transport = text(&agent["transport"]),
        version = text(&agent["version"]),
        instance = text(&status["instance"]),
        since = when(&status["connected_since"]),
        printer = escape(status["printer"]["state"].as_str().unwrap_or("unknown")),
        failure = failure(&status["printer"]),
        kind = text(&traffic["printer_kind"]),
        serial = text(&traffic["printer_serial"]),
        from = traffic["from_printer_last_minute"].as_u64().unwrap_or(0),
        to = traffic["to_printer_last_minute"].as_u64().unwrap_or(0),
        last = when(&traffic["last_printer_message_at"]),
    );
    let apps = status["apps"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let _ = write!(
        out,
        "<h2>Apps connected <span id=\"apps-count\">{}</span></h2>",
        status["apps_connected"].as_u64().unwrap_or(0)
    );
    if apps.is_empty() {
        out.push_str("<p>None right now.</p>");
    } else {
        out.push_str(
            "<div class=\"scroll\"><table id=\"apps\"><tr><th>Client id</th><th>MQTT</th><th>Via</th><th>Address</th><th>Since</th><th>Key</th><th>Instance</th></tr>",
        );
        for app in apps {
            let key = app["key_label"]
                .as_str()
                .filter(|label| !label.is_empty())
                .or(app["key_id"].as_str())
                .unwrap_or("-");
            let _ = write!(
                out,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                text(&app["client_id"]),
                text(&app["mqtt_version"]),
                text(&app["transport"]),
                text(&app["address"]),
                when(&app["since"]),
                escape(key),
                text(&app["instance"]),
            );
        }
        out.push_str("</table></div>");
    }
    if let Some(unanswered) = status["instances_unanswered"].as_array()
        && !unanswered.is_empty()
    {
        let _ = write!(
            out,
            "<p class=\"warning\">{} instance(s) did not answer: their apps are not listed.</p>",
            unanswered.len()
        );
    }
    out
}

async fn device_page(
    state: &EdgeState,
    visitor: &Visitor,
    device_id: &str,
    shown: Option<(&str, &str)>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let store = state.authenticator.store();
    let device = store
        .tenant_device(&visitor.caller.tenant_id, device_id)
        .await?;
    let status = device_json(state, &device).await?;
    let keys: Vec<_> = store
        .list_api_keys(Some(&visitor.caller.tenant_id))
        .await?
        .into_iter()
        .filter(|key| key.device_id.as_deref() == Some(device.id.as_str()))
        .collect();
    let mut content = String::new();
    if let Some((what, secret)) = shown {
        let _ = write!(
            content,
            "<div class=\"secret\"><p>The new {what}, shown this once:</p><p><code id=\"secret\">{}</code></p></div>",
            escape(secret)
        );
        if what == "key" {
            let mqtts_port = state
                .config
                .public
                .mqtts_listen
                .map(|address| address.port())
                .filter(|port| *port != 0)
                .unwrap_or(8883);
            content.push_str(&recipes(&visitor.host, mqtts_port, &device.id, secret));
        }
    }
    content.push_str(&status_section(&status["status"], &device.id));
    content.push_str(&message_view(&device.id));
    content.push_str(
        "<h2>Keys</h2><div class=\"scroll\"><table><tr><th>Label</th><th>Scope</th><th>Expires</th><th>Last used</th><th>State</th></tr>",
    );
    for key in &keys {
        let _ = write!(
            content,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&key.label),
            key.scope.as_str(),
            key.expires_at.map_or_else(|| "never".to_owned(), utc),
            key.last_used_at.map_or_else(|| "never".to_owned(), utc),
            if key.revoked_at.is_some() {
                "revoked"
            } else {
                "live"
            }
        );
    }
    let _ = write!(
        content,
        "</table></div>\
         <h2>New key for this device</h2><form method=\"post\" action=\"/keys\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><input type=\"hidden\" name=\"device_id\" value=\"{id}\">\
         <label>Label <input name=\"label\" maxlength=\"128\"></label> \
         <select name=\"scope\"><option value=\"read\">read</option><option value=\"control\">control</option></select> \
         <button type=\"submit\">Create key</button></form>\
         <h2>Agent credential</h2><form method=\"post\" action=\"/devices/{id}/agent-credential\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\">Issue or rotate</button></form>",
        csrf = visitor.csrf,
        id = escape(&device.id),
    );
    Ok(html(
        StatusCode::OK,
        page(&device.name, Some(visitor), &content),
    ))
}

async fn keys_page(
    state: &EdgeState,
    visitor: &Visitor,
    shown: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let store = state.authenticator.store();
    let keys = store.list_api_keys(Some(&visitor.caller.tenant_id)).await?;
    let apps: std::collections::HashMap<String, String> = store
        .app_grants(&visitor.caller.tenant_id)
        .await?
        .into_iter()
        .collect();
    let mut content = String::new();
    if let Some(secret) = shown {
        let _ = write!(
            content,
            "<div class=\"secret\"><p>The new key, shown this once:</p><p><code id=\"secret\">{}</code></p></div>",
            escape(secret)
        );
    }
    content.push_str(
        "<div class=\"scroll\"><table><tr><th>Label</th><th>Scope</th><th>Device</th><th>Expires</th><th>Last used</th><th></th></tr>",
    );
    for key in &keys {
        let action = if key.revoked_at.is_some() {
            "revoked".to_owned()
        } else {
            format!(
                "<form method=\"post\" action=\"/keys/{id}/revoke\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <button type=\"submit\" id=\"revoke-{id}\">Revoke</button></form>",
                id = escape(&key.id),
                csrf = visitor.csrf
            )
        };
        let _ = write!(
            content,
            "<tr><td>{label}{app}<br><code>{id}</code></td><td>{scope}</td><td>{device}</td><td>{expires}</td><td>{used}</td><td>{action}</td></tr>",
            label = escape(&key.label),
            app = apps.get(&key.id).map_or_else(String::new, |app| {
                format!(" <span class=\"badge app\">app: {}</span>", escape(app))
            }),
            id = escape(&key.id),
            scope = key.scope.as_str(),
            device = escape(key.device_id.as_deref().unwrap_or("any")),
            expires = key.expires_at.map_or_else(|| "never".to_owned(), utc),
            used = key.last_used_at.map_or_else(|| "never".to_owned(), utc),
        );
    }
    content.push_str("</table></div>");
    Ok(html(StatusCode::OK, page("Keys", Some(visitor), &content)))
}

/// The devices' agent credentials: which is live since when, with
/// rotate and revoke (the agent is disconnected at once).
async fn agents_page(
    state: &EdgeState,
    visitor: &Visitor,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let store = state.authenticator.store();
    let devices = store.list_devices(Some(&visitor.caller.tenant_id)).await?;
    let mut content = String::from(
        "<p>Each device's agent signs in with its own credential. Rotating makes a new one \
         (shown once) and ends the old; revoking disconnects the agent.</p>\
         <div class=\"scroll\"><table><tr><th>Device</th><th>Credential</th><th>Since</th><th></th></tr>",
    );
    for device in &devices {
        let credential = store.agent_credential_of(&device.id).await?;
        let form = |action: &str, label: &str, id: &str| {
            format!(
                "<form method=\"post\" action=\"/devices/{device}/{action}\" class=\"inline\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <button type=\"submit\" id=\"{id}-{device}\">{label}</button></form>",
                device = escape(&device.id),
                csrf = visitor.csrf,
            )
        };
        let (id, since, actions) = match &credential {
            Some(credential) => (
                format!("<code>{}</code>", escape(&credential.id)),
                utc(credential.created_at),
                format!(
                    "{} {}",
                    form("agent-credential", "Rotate", "rotate"),
                    form("agent-credential/revoke", "Revoke", "revoke-agent")
                ),
            ),
            None => (
                "none".to_owned(),
                "-".to_owned(),
                form("agent-credential", "Issue", "issue"),
            ),
        };
        let _ = write!(
            content,
            "<tr><td><a href=\"/devices/{device}\">{name}</a></td><td>{id}</td><td>{since}</td><td>{actions}</td></tr>",
            device = escape(&device.id),
            name = escape(&device.name),
        );
    }
    content.push_str("</table></div>");
    Ok(html(
        StatusCode::OK,
        page("Agent credentials", Some(visitor), &content),
    ))
}

async fn audit_page(
    state: &EdgeState,
    visitor: &Visitor,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let entries = state
        .authenticator
        .store()
        .audit_log(&visitor.caller.tenant_id, 200)
        .await?;
    let mut content = String::from(
        "<div class=\"scroll\"><table><tr><th>When</th><th>Who</th><th>What</th><th>Target</th><th>From</th></tr>",
    );
    for entry in &entries {
        let _ = write!(
            content,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            utc(entry.at),
            escape(&entry.actor),
            escape(&entry.action),
            escape(&entry.target),
            escape(&entry.address)
        );
    }
    content.push_str("</table></div>");
    Ok(html(
        StatusCode::OK,
        page("Audit log", Some(visitor), &content),
    ))
}

/// A console form's change.
struct Change<'a> {
    state: &'a EdgeState,
    visitor: &'a Visitor,
    address: String,
}

impl Change<'_> {
    fn changes(&self) -> TenantChanges<'_> {
        TenantChanges {
            state: self.state,
            caller: &self.visitor.caller,
            address: &self.address,
        }
    }

    /// `POST /authorize`: the owner allowed (for the printers ticked) or
    /// denied; back to the app with a code, or with `access_denied`.
    async fn authorize(&self, form: &Form) -> Result<Response<Full<Bytes>>, ApiError> {
        use crate::app_consent::with_query;
        let request = match crate::app_consent::check(self.state, form).await {
            Ok(request) => request,
            Err(problem) => return Ok(authorize_problem(self.visitor, problem)),
        };
        let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
        if field("decision") != "allow" {
            self.changes()
                .audit("app.deny", &request.app.id, &request.app.name)
                .await?;
            return Ok(redirect(&with_query(
                &request.redirect_uri,
                &[
                    ("error", "access_denied"),
                    ("error_description", "the owner denied access"),
                    ("state", &request.state),
                ],
            )));
        }
        let store = self.state.authenticator.store();
        let tenant = &self.visitor.caller.tenant_id;
        let mut devices = Vec::new();
        for device_id in field("device").split(' ').filter(|id| !id.is_empty()) {
            devices.push(store.tenant_device(tenant, device_id).await?.id);
        }
        if devices.is_empty() {
            return Err(ApiError::bad_request_text(
                "tick at least one printer, or press Deny",
            ));
        }
        let code = store
            .create_authorization_code(&relay_store::oauth_apps::Consent {
                app: &request.app,
                tenant_id: tenant,
                device_ids: &devices,
                scope: request.scope,
                redirect_uri: &request.redirect_uri,
                code_challenge: &request.code_challenge,
            })
            .await?;
        self.changes()
            .audit(
                "app.allow",
                &request.app.id,
                &format!(
                    "{} ({}) for {}",
                    request.app.name,
                    request.scope.as_str(),
                    devices.join(" ")
                ),
            )
            .await?;
        Ok(redirect(&with_query(
            &request.redirect_uri,
            &[("code", &code.reveal()), ("state", &request.state)],
        )))
    }

    /// `POST /pair`: the typed code, within the guess limits; the pairing
    /// it names, with the tenant's devices to pick from.
    async fn find_pairing(
        &self,
        peer: IpAddr,
        form: &Form,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let code = form.get("code").map(String::as_str).unwrap_or_default();
        let tenant = &self.visitor.caller.tenant_id;
        let pending = match crate::pairing::enter_code(self.state, tenant, peer, code).await? {
            crate::pairing::CodeEntry::Found(pending) => pending,
            crate::pairing::CodeEntry::NotFound => {
                return Ok(pair_page(
                    self.visitor,
                    code,
                    Some(
                        "No agent is waiting with this code. Check it, or run the agent's setup again: a code lives 15 minutes.",
                    ),
                ));
            }
            crate::pairing::CodeEntry::Limited(_) => {
                let mut response = pair_page(
                    self.visitor,
                    code,
                    Some("Too many wrong codes: wait a minute, then try again."),
                );
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                return Ok(response);
            }
        };
        let devices = self
            .state
            .authenticator
            .store()
            .list_devices(Some(tenant))
            .await?;
        let mut options = String::new();
        for device in &devices {
            let _ = write!(
                options,
                "<option value=\"{id}\">{name} ({id})</option>",
                id = escape(&device.id),
                name = escape(&device.name)
            );
        }
        let content = format!(
            "<p>An agent asked to pair from <code>{from}</code> at {at}. Approve it only if it is yours: \
             it gets the device's agent credential (an agent already paired with that device is disconnected).</p>\
             <form method=\"post\" action=\"/pair/decide\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"code\" value=\"{code}\">\
             <p><label>Device <select name=\"device_id\" id=\"pair-device\"><option value=\"\">A new device…</option>{options}</select></label></p>\
             <p><label>New device's name <input name=\"name\" id=\"pair-name\" maxlength=\"128\"></label></p>\
             <button type=\"submit\" name=\"decision\" value=\"approve\" id=\"pair-approve\">Approve</button> \
             <button type=\"submit\" name=\"decision\" value=\"deny\" id=\"pair-deny\">Deny</button></form>",
            from = escape(&pending.requested_from),
            at = utc(pending.created_at),
            csrf = self.visitor.csrf,
            code = escape(code),
        );
        Ok(html(
            StatusCode::OK,
            page("Pair an agent", Some(self.visitor), &content),
        ))
    }

    /// `POST /pair/decide`: approve (for a device of the tenant's, or a
    /// new one) or deny the pairing the code names.
    async fn decide_pairing(&self, form: &Form) -> Result<Response<Full<Bytes>>, ApiError> {
        let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
        let store = self.state.authenticator.store();
        let device = match field("decision") {
            "approve" => {
                // The code is checked before a new device is made for it.
                if store.pending_pairing(field("code")).await?.is_none() {
                    return Ok(pair_page(
                        self.visitor,
                        field("code"),
                        Some("This pairing is no longer waiting: it expired or was decided."),
                    ));
                }
                Some(match field("device_id") {
                    "" => self.changes().create_device(field("name")).await?,
                    id => {
                        store
                            .tenant_device(&self.visitor.caller.tenant_id, id)
                            .await?
                    }
                })
            }
            "deny" => None,
            _ => return Err(ApiError::bad_request_text("approve or deny")),
        };
        self.changes()
            .decide_pairing(
                field("code"),
                device.as_ref().map(|device| device.id.as_str()),
            )
            .await?;
        let content = match &device {
            Some(device) => format!(
                "<p id=\"pair-done\">Approved. The agent gets its credential for \
                 <a href=\"/devices/{id}\">{name}</a> within a few seconds, then connects.</p>",
                id = escape(&device.id),
                name = escape(&device.name)
            ),
            None => "<p id=\"pair-done\">Denied. The agent is told so.</p>".to_owned(),
        };
        Ok(html(
            StatusCode::OK,
            page("Pair an agent", Some(self.visitor), &content),
        ))
    }

    async fn post(&self, path: &str, form: &Form) -> Result<Response<Full<Bytes>>, ApiError> {
        let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
        if path == "/logout" {
            self.state
                .authenticator
                .store()
                .revoke_admin_session(&self.visitor.session)
                .await?;
            self.changes()
                .audit("session.end", &self.visitor.caller.actor, "")
                .await?;
            return Ok(signed_out_response());
        }
        if path == "/devices" {
            let device = self.changes().create_device(field("name")).await?;
            return Ok(redirect(&format!("/devices/{}", device.id)));
        }
        if path == "/keys" {
            let scope = Scope::parse(field("scope"))
                .ok_or_else(|| ApiError::bad_request_text("scope must be read or control"))?;
            let device_id = Some(field("device_id")).filter(|id| !id.is_empty());
            let (_, credential) = self
                .changes()
                .create_key(field("label"), scope, device_id, None)
                .await?;
            let secret = credential.reveal();
            return match device_id {
                Some(device_id) => {
                    device_page(self.state, self.visitor, device_id, Some(("key", &secret))).await
                }
                None => keys_page(self.state, self.visitor, Some(&secret)).await,
            };
        }
        if let Some(key_id) = path
            .strip_prefix("/keys/")
            .and_then(|rest| rest.strip_suffix("/revoke"))
        {
            self.changes().revoke_key(key_id).await?;
            return Ok(redirect("/keys"));
        }
        if let Some(device_id) = path
            .strip_prefix("/devices/")
            .and_then(|rest| rest.strip_suffix("/agent-credential/revoke"))
        {
            self.changes().revoke_agent_credential(device_id).await?;
            return Ok(redirect("/agents"));
        }
        if let Some(device_id) = path
            .strip_prefix("/devices/")
            .and_then(|rest| rest.strip_suffix("/agent-credential"))
        {
            let (device, _, issued) = self.changes().issue_agent_credential(device_id).await?;
            let secret = issued.reveal();
            return device_page(
                self.state,
                self.visitor,
                &device.id,
                Some(("agent credential", &secret)),
            )
            .await;
        }
        Err(ApiError::not_found("no such form"))
    }
}

/// A query string's value of `name`, decoded.
fn query_value(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| crate::form::form_decode(value))
        .unwrap_or_default()
}

/// An authorization request's problem: shown (nothing is sent to an
/// unknown app or address), or sent back to the app.
fn authorize_problem(
    visitor: &Visitor,
    problem: crate::app_consent::AuthorizeProblem,
) -> Response<Full<Bytes>> {
    match (problem.location(), problem) {
        (Some(location), _) => redirect(&location),
        (None, crate::app_consent::AuthorizeProblem::Shown(text)) => html(
            StatusCode::BAD_REQUEST,
            page(
                "An app's request",
                Some(visitor),
                &format!(
                    "<p class=\"warning\" id=\"authorize-problem\">{}</p>",
                    escape(&text)
                ),
            ),
        ),
        (None, _) => html(StatusCode::BAD_REQUEST, String::new()),
    }
}

/// `GET /authorize`: what an app asks for, which printers to give it,
/// Allow or Deny.
async fn authorize_page(
    state: &EdgeState,
    visitor: &Visitor,
    query: &Form,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let request = match crate::app_consent::check(state, query).await {
        Ok(request) => request,
        Err(problem) => return Ok(authorize_problem(visitor, problem)),
    };
    let devices = state
        .authenticator
        .store()
        .list_devices(Some(&visitor.caller.tenant_id))
        .await?;
    let mut choices = String::new();
    for device in &devices {
        let _ = write!(
            choices,
            "<p><label><input type=\"checkbox\" name=\"device\" value=\"{id}\" id=\"device-{id}\"> {name}</label></p>",
            id = escape(&device.id),
            name = escape(&device.name)
        );
    }
    let asks = match request.scope {
        Scope::Read => "to <strong>see</strong> your printers: their status and reports (read)",
        Scope::Control => {
            "to <strong>see and control</strong> your printers: status, reports and commands (control)"
        }
    };
    let mut hidden = String::new();
    for name in [
        "client_id",
        "redirect_uri",
        "response_type",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
    ] {
        let _ = write!(
            hidden,
            "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
            escape(query.get(name).map(String::as_str).unwrap_or_default())
        );
    }
    let content = format!(
        "<p><strong id=\"app-name\">{app}</strong> asks {asks}.</p>\
         <p>It gets its own key for each printer you tick, which you can revoke on the Keys page at any time.</p>\
         <form method=\"post\" action=\"/authorize\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{hidden}\
         {choices}\
         <button type=\"submit\" name=\"decision\" value=\"allow\" id=\"allow\">Allow</button> \
         <button type=\"submit\" name=\"decision\" value=\"deny\" id=\"deny\">Deny</button></form>",
        app = escape(&request.app.name),
        csrf = visitor.csrf,
    );
    let mut response = html(
        StatusCode::OK,
        page("An app asks for access", Some(visitor), &content),
    );
    // The form's answer sends the browser on to the app: the policy lets
    // the form go to the app's registered origin, and nowhere else.
    let origin = {
        let uri = &request.redirect_uri;
        let after_scheme = uri.find("://").map_or(0, |at| at + 3);
        let end = uri[after_scheme..]
            .find(['/', '?'])
            .map_or(uri.len(), |at| after_scheme + at);
        &uri[..end]
    };
    let origin = if origin.contains([';', ',', '\'']) {
        ""
    } else {
        origin
    };
    if let Ok(policy) = HeaderValue::from_str(&format!(
        "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; form-action 'self' {origin}; frame-ancestors 'none'"
    )) {
        response
            .headers_mut()
            .insert("content-security-policy", policy);
    }
    Ok(response)
}

/// `/pair`: where the owner types the code the agent shows (or arrives
/// with it from the agent's QR code), with what went wrong last, if
/// anything.
fn pair_page(visitor: &Visitor, code: &str, problem: Option<&str>) -> Response<Full<Bytes>> {
    let problem = problem.map_or_else(String::new, |problem| {
        format!(
            "<p class=\"warning\" id=\"pair-problem\">{}</p>",
            escape(problem)
        )
    });
    let content = format!(
        "<p>Run <code>relay-agent setup</code> beside your printer: it shows a code of 8 letters. \
         Type it here, then pick the device the agent is for.</p>{problem}\
         <form method=\"post\" action=\"/pair\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>Code <input name=\"code\" id=\"pair-code\" value=\"{code}\" autocomplete=\"off\" \
         autocapitalize=\"characters\" maxlength=\"12\" required></label> \
         <button type=\"submit\" id=\"pair-find\">Continue</button></form>",
        csrf = visitor.csrf,
        code = escape(code),
    );
    html(
        if problem.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        },
        page("Pair an agent", Some(visitor), &content),
    )
}

fn signed_out_response() -> Response<Full<Bytes>> {
    let mut response = redirect("/");
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "relay_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}

/// `GET /console/live`: a WebSocket on which the tenant's devices' status
/// is sent whenever it changes (looked at every second). Same origin only.
fn live(
    mut request: Request<Incoming>,
    state: &Arc<EdgeState>,
    tenant_id: String,
) -> Response<Full<Bytes>> {
    let Some(accept) = same_origin_upgrade(&request, state) else {
        return html(StatusCode::FORBIDDEN, String::new());
    };
    let upgrade = hyper::upgrade::on(&mut request);
    let state = state.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let socket = console_socket(upgraded).await;
        let (mut sink, mut stream) = socket.split();
        let mut last: Arc<str> = Arc::from("");
        let mut every = tokio::time::interval(LIVE_INTERVAL);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                message = stream.next() => match message {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    _ => continue,
                },
            }
            let Ok(now) = live_status(&state, &tenant_id).await else {
                continue;
            };
            if now != last {
                if sink.send(Message::Text(now.as_ref().into())).await.is_err() {
                    return;
                }
                last = now;
            }
        }
    });
    switching_protocols(&accept)
}

/// A console page's WebSocket, with small buffers: the page sends nothing
/// but its close, and what it is sent is a few hundred bytes, or a
/// message cut to 2 KiB (tungstenite's defaults hold 128 KiB per socket).
async fn console_socket(
    upgraded: hyper::upgrade::Upgraded,
) -> WebSocketStream<TokioIo<hyper::upgrade::Upgraded>> {
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(Some(1024))
        .max_frame_size(Some(1024));
    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await
}

/// A console WebSocket's handshake answer.
fn switching_protocols(accept: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(value) = HeaderValue::from_str(accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}

/// A console WebSocket's `Sec-WebSocket-Accept`, if the request is a
/// WebSocket handshake from a page of the console's own origin (a
/// browser sends the cookie with any site's handshake; `Origin` tells).
fn same_origin_upgrade(request: &Request<Incoming>, state: &EdgeState) -> Option<String> {
    let base = &state.config.public.base_domain;
    let same_origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|origin| origin.to_str().ok())
        .and_then(|origin| {
            origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"))
        })
        .map(|host| host.rsplit_once(':').map_or(host, |(name, _)| name))
        .is_some_and(|host| host.eq_ignore_ascii_case(base));
    let key = request
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| derive_accept_key(key.as_bytes()));
    key.filter(|_| same_origin)
}

/// Message views one tenant may have open at once.
const MAX_WATCHERS_PER_TENANT: usize = 8;
/// Messages a view is sent per second at most; the rest are counted.
const WATCH_MESSAGES_PER_SECOND: u32 = 10;
/// Payload bytes a view shows of a message.
const WATCH_PAYLOAD_BYTES: usize = 2048;
/// What a view's hub session may hold queued before the hub cuts it (the
/// printer connection is never slowed for it).
const WATCH_QUEUE_BYTES: usize = 256 * 1024;

/// `GET /console/messages/<device>`: a read-only view of the printer's
/// topics, over a WebSocket. It is a session of the device's hub like an
/// app's (subscribed to what the device's topic policy allows), that never
/// publishes; messages are sent at most [`WATCH_MESSAGES_PER_SECOND`],
/// each cut to [`WATCH_PAYLOAD_BYTES`]. The page opens it only when the
/// owner presses Watch.
async fn watch_messages(
    mut request: Request<Incoming>,
    state: &Arc<EdgeState>,
    tenant_id: &str,
    device_id: &str,
) -> Response<Full<Bytes>> {
    let Some(accept) = same_origin_upgrade(&request, state) else {
        return html(StatusCode::FORBIDDEN, String::new());
    };
    let store = state.authenticator.store();
    if store.tenant_device(tenant_id, device_id).await.is_err() {
        return html(StatusCode::NOT_FOUND, String::new());
    }
    let Some(watcher) = WatcherPlace::take(state, tenant_id) else {
        return html(StatusCode::TOO_MANY_REQUESTS, String::new());
    };
    let upgrade = hyper::upgrade::on(&mut request);
    let state = state.clone();
    let device_id = device_id.to_owned();
    tokio::spawn(async move {
        let _watcher = watcher;
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        serve_watcher(console_socket(upgraded).await, &state, &device_id).await;
    });
    switching_protocols(&accept)
}

/// One of a tenant's [`MAX_WATCHERS_PER_TENANT`] message views, given back
/// when dropped.
struct WatcherPlace {
    state: Arc<EdgeState>,
    tenant_id: String,
}

impl WatcherPlace {
    fn take(state: &Arc<EdgeState>, tenant_id: &str) -> Option<WatcherPlace> {
        let mut open = state
            .console_watchers
            .entry(tenant_id.to_owned())
            .or_insert(0);
        if *open >= MAX_WATCHERS_PER_TENANT {
            return None;
        }
        *open += 1;
        Some(WatcherPlace {
            state: state.clone(),
            tenant_id: tenant_id.to_owned(),
        })
    }
}

impl Drop for WatcherPlace {
    fn drop(&mut self) {
        self.state
            .console_watchers
            .remove_if_mut(&self.tenant_id, |_, open| {
                *open = open.saturating_sub(1);
                *open == 0
            });
    }
}

/// Runs one message view until the page closes it or the hub ends.
async fn serve_watcher<S>(socket: WebSocketStream<S>, state: &EdgeState, device_id: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use relay_hub_io::{Outbound, outbound_queue};
    use relay_proto::mqtt::{Packet, QoS, Subscribe};

    let (mut sink, mut stream) = socket.split();
    let say = |value: Value| Message::Text(value.to_string().into());
    let hub = match state.devices.hub_for(device_id).await {
        Ok(hub) => hub,
        Err(_) => {
            let _ = sink
                .send(say(serde_json::json!({ "event": "offline" })))
                .await;
            let _ = sink.close().await;
            return;
        }
    };
    let session_id = state.hubs.next_session_id();
    let (outbound, mut receiver, _ended) = outbound_queue(WATCH_QUEUE_BYTES);
    let filters: Vec<(String, QoS)> = hub
        .policy()
        .allow
        .iter()
        .filter(|filter| hub.policy().permits_filter(filter))
        .map(|filter| (filter.clone(), QoS::AtMostOnce))
        .collect();
    let attached = hub
        .attach(
            session_id,
            relay_hub::SessionAttach {
                sink: outbound.clone(),
                client_id: String::new(),
                will: None,
                max_subscriptions: filters.len().max(1),
                max_unacknowledged: 1,
                peer: false,
                mqtt5: false,
            },
        )
        .await;
    drop(outbound);
    // One SUBSCRIBE per filter: one the printer refuses spoils no other.
    let mut subscribed = attached && !filters.is_empty();
    for (index, filter) in filters.into_iter().enumerate() {
        let Some(packet_id) = u16::try_from(index + 1)
            .ok()
            .and_then(std::num::NonZeroU16::new)
        else {
            break;
        };
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id,
            filters: vec![filter],
        });
        subscribed = subscribed && hub.client_packet(session_id, subscribe).await;
    }
    if !subscribed {
        hub.detach(session_id, true).await;
        let _ = sink
            .send(say(serde_json::json!({ "event": "offline" })))
            .await;
        let _ = sink.close().await;
        return;
    }
    let _ = sink
        .send(say(serde_json::json!({ "event": "watching" })))
        .await;
    let mut budget = WATCH_MESSAGES_PER_SECOND;
    let mut skipped: u64 = 0;
    let mut refill = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            item = receiver.recv() => {
                let bytes = match item {
                    Some(Outbound::Bytes(bytes)) => bytes,
                    Some(Outbound::Close(_)) | None => {
                        let _ = sink.send(say(serde_json::json!({ "event": "ended" }))).await;
                        break;
                    }
                    Some(_) => continue,
                };
                let mut buffer = bytes::BytesMut::from(bytes.as_ref());
                while let Ok(Some(packet)) = relay_proto::mqtt::decode(&mut buffer, usize::MAX) {
                    let Packet::Publish(publish) = packet else {
                        continue;
                    };
                    if budget == 0 {
                        skipped += 1;
                        continue;
                    }
                    budget -= 1;
                    let shown = &publish.payload[..publish.payload.len().min(WATCH_PAYLOAD_BYTES)];
                    let message = serde_json::json!({
                        "event": "message",
                        "topic": publish.topic,
                        "size": publish.payload.len(),
                        "payload": String::from_utf8_lossy(shown),
                        "cut": shown.len() < publish.payload.len(),
                        "skipped": skipped,
                    });
                    skipped = 0;
                    if sink.send(say(message)).await.is_err() {
                        hub.detach(session_id, true).await;
                        return;
                    }
                }
            }
            _ = refill.tick() => budget = WATCH_MESSAGES_PER_SECOND,
            message = stream.next() => match message {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            },
        }
    }
    hub.detach(session_id, true).await;
    let _ = sink.close().await;
}

/// Tenants whose live status is kept at most; past that, old entries go.
const MAX_CACHED_TENANTS: usize = 10_000;

/// The devices' status as the devices page shows it, made at most once a
/// second per tenant however many of its pages are open.
async fn live_status(state: &EdgeState, tenant_id: &str) -> Result<Arc<str>, ApiError> {
    let fresh = |made: &std::time::Instant| made.elapsed() < LIVE_INTERVAL.mul_f32(0.9);
    if let Some(entry) = state.console_status.get(tenant_id)
        && fresh(&entry.0)
    {
        return Ok(entry.1.clone());
    }
    let status: Arc<str> = make_live_status(state, tenant_id).await?.into();
    if state.console_status.len() >= MAX_CACHED_TENANTS {
        state.console_status.retain(|_, (made, _)| fresh(made));
    }
    state.console_status.insert(
        tenant_id.to_owned(),
        (std::time::Instant::now(), status.clone()),
    );
    Ok(status)
}

/// What the devices page shows of a device, and updates live.
fn live_row(device: &Value) -> Value {
    let status = &device["status"];
    let online = status["online"] == true;
    serde_json::json!({
        "id": device["id"],
        "online": online,
        "transport": if online { status["agent"]["transport"].as_str().unwrap_or("") } else { "" },
        "printer": status["printer"]["state"].as_str().unwrap_or("unknown"),
        "apps": status["apps_connected"].as_u64().unwrap_or(0),
    })
}

async fn make_live_status(state: &EdgeState, tenant_id: &str) -> Result<String, ApiError> {
    let store = state.authenticator.store();
    let devices = store.list_devices(Some(tenant_id)).await?;
    let statuses = devices_json(state, &devices).await?;
    let out: Vec<Value> = statuses.iter().map(live_row).collect();
    Ok(Value::Array(out).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_milliseconds_read_as_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_534_063_000), "2026-12-06 05:14:23 UTC");
        assert_eq!(utc(-1_000), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn a_failure_reads_as_the_agent_said_it() {
        let printer = serde_json::json!({"reason": "credentials_refused", "detail": "bad <code>"});
        assert_eq!(failure(&printer), "credentials_refused: bad &lt;code&gt;");
        assert_eq!(failure(&Value::Null), "-");
    }
}
