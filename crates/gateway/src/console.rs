//! The web console: static files compiled into the binary and served at `/`
//! (`[server] console = false` turns it off). It is a client of the public protocol over
//! WebSocket like any other; these routes only deliver its files, under a strict
//! Content-Security-Policy (no inline script or style, no other origin).

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

const INDEX: &str = include_str!("../console/index.html");

/// The console's files by path: one ES module per page, a shared core, and the style sheet.
const FILES: &[(&str, &str, &str)] = &[
    ("/console/app.js", JS, include_str!("../console/app.js")),
    ("/console/core.js", JS, include_str!("../console/core.js")),
    ("/console/runs.js", JS, include_str!("../console/runs.js")),
    ("/console/run.js", JS, include_str!("../console/run.js")),
    ("/console/tree.js", JS, include_str!("../console/tree.js")),
    (
        "/console/approvals.js",
        JS,
        include_str!("../console/approvals.js"),
    ),
    ("/console/start.js", JS, include_str!("../console/start.js")),
    (
        "/console/signals.js",
        JS,
        include_str!("../console/signals.js"),
    ),
    (
        "/console/schedules.js",
        JS,
        include_str!("../console/schedules.js"),
    ),
    (
        "/console/app.css",
        "text/css; charset=utf-8",
        include_str!("../console/app.css"),
    ),
];
const JS: &str = "text/javascript; charset=utf-8";

/// Only the console's own files, its own host's WebSocket, and nothing inline.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The file at `path`, if it is one of the console's.
pub fn asset(path: &str) -> Option<Response> {
    let (body, kind) = match path {
        "/" | "/index.html" => (INDEX, "text/html; charset=utf-8"),
        _ => FILES
            .iter()
            .find(|(p, _, _)| *p == path)
            .map(|(_, kind, body)| (*body, *kind))?,
    };
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(r)
}

/// Every console file and its size in bytes (uncompressed), for the size figure in
/// `docs/benchmarks.md`.
pub fn files() -> impl Iterator<Item = (&'static str, usize)> {
    std::iter::once(("/", INDEX.len())).chain(FILES.iter().map(|(p, _, b)| (*p, b.len())))
}

#[cfg(test)]
mod module_tests {
    use super::*;

    /// A module imported by another (`from "./x.js"`) or by the page must be served, else the
    /// console fails in the browser with nothing but a console error.
    #[test]
    fn every_imported_module_is_served() {
        let mut wanted: Vec<String> = Vec::new();
        for (_, _, body) in FILES.iter().chain([("/", "", INDEX)].iter()) {
            for part in body.split("from \"./").skip(1) {
                if let Some(name) = part.split('"').next() {
                    wanted.push(format!("/console/{name}"));
                }
            }
            for part in body
                .split("src=\"")
                .skip(1)
                .chain(body.split("href=\"/").skip(1))
            {
                if let Some(name) = part.split('"').next()
                    && name.contains("console/")
                {
                    wanted.push(format!("/{}", name.trim_start_matches('/')));
                }
            }
        }
        assert!(wanted.len() > 8, "{wanted:?}");
        for w in wanted {
            assert!(asset(&w).is_some(), "{w} is imported but not served");
        }
    }
}
