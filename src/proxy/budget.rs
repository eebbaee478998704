//! Memory budgets of a queued request, as tests.
//!
//! A queue may hold many thousands of requests, and each keeps the state of
//! its request future while it waits: the future `Proxy::handle` returns,
//! which hyper's per-stream task holds. Writing a step as a plain `async fn`
//! silently makes that state larger (see `Proxy::handle`), so its size is
//! checked here. The figures are those of the test profile (unoptimised);
//! the release build's are smaller, and BENCHMARKS.md measures what a queued
//! request really costs there.

use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;

use super::Proxy;

/// Size of what `step` returns, without calling it.
fn output_size<F, A, B, C, R>(_step: F) -> usize
where
    F: FnOnce(A, B, C) -> R,
{
    std::mem::size_of::<R>()
}

/// The request future's size in the test profile. In release it is 680
/// bytes, and hyper's task for an h2 stream (rounded up to 128 bytes) is
/// 896: a few bytes more there would cost 128 per queued request.
const REQUEST_FUTURE: usize = 688;

#[test]
fn a_queued_request_future_stays_within_its_budget() {
    let handle: fn(Arc<Proxy>, SocketAddr, Request<Incoming>) -> _ = Proxy::handle;
    let size = output_size(handle);
    assert!(size <= REQUEST_FUTURE, "Proxy::handle's future grew to {size} bytes (budget {REQUEST_FUTURE})");
}
