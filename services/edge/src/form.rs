//! HTML forms (`application/x-www-form-urlencoded`) as the console and
//! the OAuth endpoints read them: at most the tenant API's body size.

use http_body_util::{BodyExt, Limited};
use hyper::Request;
use hyper::body::Incoming;

use crate::tenant_api::{ApiError, MAX_BODY_BYTES};

/// A form's fields by name (the last of a repeated name wins).
pub type Form = std::collections::HashMap<String, String>;

pub async fn read_form(request: Request<Incoming>) -> Result<Form, ApiError> {
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| ApiError::bad_request_text("the form is too large or could not be read"))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body)
        .split('&')
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            Some((form_decode(name), form_decode(value)))
        })
        .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_and_plus_decode() {
        assert_eq!(form_decode("a+b%2Fc%3d"), "a b/c=");
        assert_eq!(form_decode("100%"), "100%");
        assert_eq!(form_decode("%zz"), "%zz");
    }
}
