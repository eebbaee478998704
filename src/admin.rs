//! The admin listener: health, and (as they land) metrics, status and reload.

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::body::{self, ProxyBody};

/// Answers one admin request.
pub async fn handle(request: Request<Incoming>) -> Response<ProxyBody> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
