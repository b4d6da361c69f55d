//! HTML forms (`application/x-www-form-urlencoded`), cookies and escaping,
//! as the console, the tenant API and the OAuth endpoints use them.

use http_body_util::{BodyExt, Limited};
use hyper::Request;
use hyper::body::Incoming;

/// The largest request body the tenant API, the console and the OAuth
/// endpoints read.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// A form over [`MAX_BODY_BYTES`], or one that could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// A form's fields by name.
pub type Form = std::collections::HashMap<String, String>;

pub async fn read_form(request: Request<Incoming>) -> Result<Form, Unreadable> {
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| Unreadable)?
        .to_bytes();
    Ok(parse_form(&String::from_utf8_lossy(&body)))
}

/// `a=1&b=2` as fields; a repeated name (checkboxes) keeps every value,
/// separated by spaces.
pub fn parse_form(text: &str) -> Form {
    let mut form = Form::new();
    for (name, value) in text.split('&').filter_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        Some((form_decode(name), form_decode(value)))
    }) {
        form.entry(name)
            .and_modify(|values: &mut String| {
                values.push(' ');
                values.push_str(&value);
            })
            .or_insert(value);
    }
    form
}

pub fn form_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[index + 1..index + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(byte) => {
                        out.push(byte);
                        index += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_names_keep_every_value() {
        let form = parse_form("device=a&device=b&csrf=x");
        assert_eq!(form["device"], "a b");
        assert_eq!(form["csrf"], "x");
    }

    #[test]
    fn percent_and_plus_decode() {
        assert_eq!(form_decode("a+b%2Fc%3d"), "a b/c=");
        assert_eq!(form_decode("100%"), "100%");
        assert_eq!(form_decode("%zz"), "%zz");
    }
}
