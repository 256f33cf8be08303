//! Cross-origin resource sharing for browsers: `rpc.cors_allowed_origins` ([`Cors`]).
//!
//! With no origins configured (the default) the server sends no CORS headers at all, so a
//! browser page from another origin cannot read its answers. With a list, a request whose
//! `Origin` is on it (or any origin, for `"*"`) gets `Access-Control-Allow-Origin`, and a
//! preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered `204` with the
//! methods and headers allowed; a preflight from another origin gets `403`. Origins are
//! compared without regard to ASCII case. Credentials (cookies) are never allowed: the API
//! has none to protect.

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, StatusCode};

/// How long a browser may cache a preflight answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";

/// Headers a preflight allows when the browser names none.
const DEFAULT_ALLOWED_HEADERS: &str = "content-type";

/// The CORS policy of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cors {
    any: bool,
    origins: Vec<String>,
}

/// What to do with a request, as far as CORS goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Preflight {
    /// Not a preflight: serve it (and [`Cors::allow_origin`] its response).
    NotOne,
    /// A preflight from an allowed origin: answer `204` with these headers.
    Allowed(HeaderMap),
    /// A preflight from an origin not on the list: answer `403`.
    Refused,
}

impl Cors {
    /// The policy for `rpc.cors_allowed_origins`; `None` (no CORS headers) for an empty list.
    pub fn new(origins: &[String]) -> Option<Cors> {
        if origins.is_empty() {
            return None;
        }
        Some(Cors {
            any: origins.iter().any(|o| o == "*"),
            origins: origins
                .iter()
                .filter(|o| *o != "*")
                .map(|o| o.to_ascii_lowercase())
                .collect(),
        })
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if allowed.
    pub fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any {
            return Some(HeaderValue::from_static("*"));
        }
        let text = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(text))
            .then(|| origin.clone())
    }

    /// Adds the CORS headers to the response to a request from `origin` (none if the
    /// origin is not allowed).
    pub fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        if !self.any {
            // The answer depends on the origin: caches must keep them apart.
            headers.append(header::VARY, HeaderValue::from_static("origin"));
        }
        if let Some(allowed) = origin.and_then(|o| self.allow_origin(o)) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        }
    }

    /// Whether a request (`method`, `headers`) is a preflight and how to answer it.
    pub fn preflight(&self, method: &Method, headers: &HeaderMap) -> Preflight {
        let (Some(origin), true) = (
            headers.get(header::ORIGIN),
            method == Method::OPTIONS
                && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD),
        ) else {
            return Preflight::NotOne;
        };
        let Some(allowed) = self.allow_origin(origin) else {
            return Preflight::Refused;
        };
        let mut out = HeaderMap::new();
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        out.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST, GET, OPTIONS"),
        );
        let requested = headers
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static(DEFAULT_ALLOWED_HEADERS));
        out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
        out.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(PREFLIGHT_MAX_AGE),
        );
        if !self.any {
            out.insert(header::VARY, HeaderValue::from_static("origin"));
        }
        Preflight::Allowed(out)
    }

    /// The status of a preflight answer.
    pub fn preflight_status(answer: &Preflight) -> StatusCode {
        match answer {
            Preflight::Refused => StatusCode::FORBIDDEN,
            _ => StatusCode::NO_CONTENT,
        }
    }
}

/// Checks one `rpc.cors_allowed_origins` entry: `"*"` or `scheme://host[:port]` (no path).
pub fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .ok_or_else(|| {
            format!("\"{origin}\" is not an origin (\"*\" or e.g. \"https://wallet.example\")")
        })?;
    if rest.is_empty()
        || rest
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "\"{origin}\" is not an origin: scheme://host[:port], without a path or a trailing /"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn value(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    fn preflight_headers(origin: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, value(origin));
        h.insert(header::ACCESS_CONTROL_REQUEST_METHOD, value("POST"));
        h
    }

    #[test]
    fn no_origins_means_no_cors() {
        assert_eq!(Cors::new(&[]), None);
    }

    #[test]
    fn a_listed_origin_is_echoed_and_others_get_nothing() {
        let cors = Cors::new(&["https://Wallet.example".to_string()]).unwrap();
        assert_eq!(
            cors.allow_origin(&value("https://wallet.example")),
            Some(value("https://wallet.example"))
        );
        assert_eq!(cors.allow_origin(&value("https://evil.example")), None);

        let mut headers = HeaderMap::new();
        cors.decorate(Some(&value("https://evil.example")), &mut headers);
        assert!(!headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        assert_eq!(headers.get(header::VARY), Some(&value("origin")));

        match cors.preflight(
            &Method::OPTIONS,
            &preflight_headers("https://wallet.example"),
        ) {
            Preflight::Allowed(h) => {
                assert_eq!(
                    h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN),
                    Some(&value("https://wallet.example"))
                );
                assert_eq!(
                    h.get(header::ACCESS_CONTROL_ALLOW_HEADERS),
                    Some(&value("content-type"))
                );
            }
            other => panic!("{other:?}"),
        }
        let refused = cors.preflight(&Method::OPTIONS, &preflight_headers("https://evil.example"));
        assert_eq!(refused, Preflight::Refused);
        assert_eq!(Cors::preflight_status(&refused), StatusCode::FORBIDDEN);
        // An OPTIONS without Access-Control-Request-Method, or a POST, is no preflight.
        let mut plain = HeaderMap::new();
        plain.insert(header::ORIGIN, value("https://wallet.example"));
        assert_eq!(cors.preflight(&Method::OPTIONS, &plain), Preflight::NotOne);
        assert_eq!(
            cors.preflight(&Method::POST, &preflight_headers("https://wallet.example")),
            Preflight::NotOne
        );
    }

    #[test]
    fn a_star_allows_any_origin() {
        let cors = Cors::new(&["*".to_string()]).unwrap();
        assert_eq!(
            cors.allow_origin(&value("https://anything.example")),
            Some(value("*"))
        );
        let mut requested = preflight_headers("null");
        requested.insert(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            value("content-type, x-client"),
        );
        match cors.preflight(&Method::OPTIONS, &requested) {
            Preflight::Allowed(h) => {
                assert_eq!(
                    h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN),
                    Some(&value("*"))
                );
                assert_eq!(
                    h.get(header::ACCESS_CONTROL_ALLOW_HEADERS),
                    Some(&value("content-type, x-client"))
                );
                assert!(!h.contains_key(header::VARY));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn origins_are_checked() {
        for good in ["*", "http://localhost:3000", "https://wallet.example"] {
            assert_eq!(check_origin(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "wallet.example",
            "https://",
            "https://wallet.example/",
            "https://wallet.example/app",
            "ftp://x",
            "https://a b",
        ] {
            assert!(check_origin(bad).is_err(), "{bad:?}");
        }
    }
}
