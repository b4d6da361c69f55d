//! [`Secret`]: a value that must never reach a log. Its `Debug` prints
//! `<redacted>`, so a struct holding one can simply derive `Debug`, and the
//! value is read only through [`Secret::expose`], which a reviewer can grep.

use std::fmt;

/// A credential, access code, password or URL with a password in it.
///
/// ```
/// use relay_proto::Secret;
/// let code = Secret::new("a1b2c3d4".to_owned());
/// assert_eq!(format!("{code:?}"), "<redacted>");
/// assert_eq!(code.expose(), "a1b2c3d4");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub const fn new(value: T) -> Secret<T> {
        Secret(value)
    }

    /// The value itself: for the wire or a comparison, never for a log.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// The value itself, by move.
    pub fn into_exposed(self) -> T {
        self.0
    }

    /// A secret made from a part of this one.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Secret<U> {
        Secret(f(self.0))
    }

    /// A secret borrowing this one's value.
    pub fn as_ref<U: ?Sized>(&self) -> Secret<&U>
    where
        T: AsRef<U>,
    {
        Secret(self.0.as_ref())
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Secret<T> {
        Secret(value)
    }
}

impl From<&str> for Secret<String> {
    fn from(value: &str) -> Secret<String> {
        Secret(value.to_owned())
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(feature = "serde")]
impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Secret<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[derive(Debug)]
    #[allow(dead_code)]
    struct Login {
        user: String,
        password: Option<Secret<String>>,
    }

    #[test]
    fn a_struct_deriving_debug_never_prints_the_secret() {
        let login = Login {
            user: "bblp".into(),
            password: Some(Secret::new("12345678".into())),
        };
        let printed = format!("{login:?} {login:#?}");
        assert!(!printed.contains("12345678"), "{printed}");
        assert!(printed.contains("bblp") && printed.contains("<redacted>"));
    }
}
