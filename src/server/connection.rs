//! Serving HTTP/1.1 and h2 on one client connection.
//!
//! Steps, each for a reason:
//! 1. the socket is read through the [`Guard`], so request heads are checked
//!    (the documented answers for malformed ones) and timed before hyper parses them;
//! 2. every request is counted in flight until its answer is fully sent, so
//!    the connection can tell a slow head from an idle keep-alive
//!    ([`Activity`]);
//! 3. the handler runs with panics caught: a panicking request is answered
//!    500 `internal_error`, logged and counted, and the connection goes on;
//! 4. the connection closes when its deadline passes, drains when shutdown
//!    starts, and is dropped when the shutdown grace is over.

use std::convert::Infallible;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::thread;

use futures_util::FutureExt;
use futures_util::future::{self, CatchUnwind, Either, Ready};
use http::{HeaderValue, Method, Request, Response, Version, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::activity::{Activity, Answering, Busy, Expired};
use super::guard::Guard;
use super::woken::Woken;
use super::{Phase, Scope};
use crate::body::{BoxError, ProxyBody};
use crate::error::ProxyError;
use crate::metrics::ClientTimeout;

/// Serves requests on `io` with `handler` until the connection ends; `scope`
/// is the client connection it belongs to (an intercepted TLS session
/// belongs to the connection whose CONNECT opened it).
pub async fn serve_connection<IO, H, F>(io: IO, scope: Scope, handler: H)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let shared = scope.shared().clone();
    let settings = &shared.settings;
    let activity =
        Arc::new(Activity::new(settings.header_read_timeout, settings.idle_timeout, settings.send_timeout));
    let io = Guard::new(io, settings.max_header_bytes, activity.clone(), shared.metrics.clone());
    let service = {
        let (activity, scope) = (activity.clone(), scope.clone());
        service_fn(move |mut request: Request<Incoming>| {
            let busy = activity.begin();
            let refused_connect_closes =
                request.method() == Method::CONNECT && request.version() < Version::HTTP_2;
            // Only a CONNECT needs its connection (a tunnel lives in its
            // scope); other requests skip the extensions map's allocation.
            if request.method() == Method::CONNECT {
                request.extensions_mut().insert(scope.clone());
            }
            let answer = match panic::catch_unwind(AssertUnwindSafe(|| handler(request))) {
                Ok(handling) => Either::Left(AssertUnwindSafe(handling).catch_unwind()),
                Err(panic) => Either::Right(future::ready(Err(panic))),
            };
            Handling { answer, finish: Some(Finish { scope: scope.clone(), busy, refused_connect_closes }) }
        })
    };
    let connection = shared.builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut closing = false;
    // A connection closed for its timeout gets that long again to go.
    let mut timed_out = false;
    // Shutdown as last seen: draining closes gracefully, stopped at once.
    let mut phase = Phase::Serving;
    loop {
        let (activity, scope) = (&activity, &scope);
        // Behind a waker of their own (see `woken`): hyper's wakes of this
        // task do not poll them.
        let timers = Woken::new(async move {
            tokio::select! {
                biased;
                expired = activity.expired(), if !closing => Timers::Expired(expired),
                () = tokio::time::sleep(settings.header_read_timeout), if timed_out => Timers::GraceOver,
                now = scope.past(phase) => Timers::Phase(now),
            }
        });
        tokio::select! {
            // The connection first: it is what wakes this task nearly
            // every time (and no random start to draw per poll).
            biased;
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(error = %error, "connection ended with an error");
                }
                return;
            }
            timers = timers => match timers {
                Timers::Expired(Expired::HeadOrIdle) => {
                    tracing::debug!("closing a connection past its header or idle timeout");
                    (closing, timed_out) = (true, true);
                    connection.as_mut().graceful_shutdown();
                }
                // Nothing more can be sent: every request on it ends now,
                // giving back its slots.
                Timers::Expired(Expired::Send) => {
                    tracing::debug!("closing a connection whose caller took nothing for send_timeout");
                    shared.metrics.timed_out(ClientTimeout::Send);
                    return;
                }
                Timers::Expired(Expired::Close) => {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
                Timers::GraceOver => return,
                Timers::Phase(now) => {
                    phase = now;
                    if phase == Phase::Stopped {
                        return;
                    }
                    if !closing {
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// What ended a connection's wait on its timers.
enum Timers {
    /// Its head, idle or send timeout (see [`Activity::expired`]).
    Expired(Expired),
    /// The time a connection closed for its timeout has to go is over.
    GraceOver,
    /// Shutdown moved on.
    Phase(Phase),
}

pin_project_lite::pin_project! {
    /// One request being handled: the handler's future, polled in place with
    /// panics caught, then finished into the connection's answer. A struct
    /// rather than an async block, which would keep the request it captured
    /// beside the handler's future: every queued request would pay for both.
    struct Handling<F> {
        #[pin]
        answer: Either<CatchUnwind<AssertUnwindSafe<F>>, Ready<thread::Result<Response<ProxyBody>>>>,
        finish: Option<Finish>,
    }
}

/// Marks an answer after which its connection closes, HTTP/2 included
/// (GOAWAY): put in the answer's extensions by the handler.
#[derive(Debug, Clone, Copy)]
pub struct CloseConnection;

/// What the connection adds to a handler's answer.
struct Finish {
    scope: Scope,
    /// Keeps the request active until its answer's body is sent.
    busy: Busy,
    refused_connect_closes: bool,
}

/// What a client connection sends: the handler's answer, its body watched
/// (no second box around the handler's one).
type Sent = Response<Watched>;

impl<F: Future<Output = Response<ProxyBody>>> Future for Handling<F> {
    type Output = Result<Sent, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answer = ready!(this.answer.poll(cx));
        let finish = this.finish.take().expect("a future is not polled again once it is ready");
        Poll::Ready(Ok(finish.answer(answer)))
    }
}

impl Finish {
    fn answer(self, answer: thread::Result<Response<ProxyBody>>) -> Sent {
        let mut response = answer.unwrap_or_else(|panic| {
            self.scope.shared().metrics.panicked(panic.as_ref(), "request");
            ProxyError::Internal("the request task panicked".into()).into_response()
        });
        // The guard stops checking heads after a CONNECT: if no tunnel
        // follows, nothing else may be read from this connection.
        if self.refused_connect_closes && !response.status().is_success() {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if response.extensions().get::<CloseConnection>().is_some() {
            self.busy.activity().close();
        }
        let answering = Some(self.busy.answering());
        response.map(|inner| Watched { inner, answering })
    }
}

pin_project_lite::pin_project! {
    /// An answer's body on its way to the caller: keeps its request in
    /// flight until it ends, and tells the connection whether the caller or
    /// the upstream is what it waits for (`send_timeout`).
    struct Watched {
        #[pin]
        inner: ProxyBody,
        answering: Option<Answering>,
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(answering) = this.answering {
                    answering.wait_for_caller();
                }
            }
            Poll::Pending => {
                if let Some(answering) = this.answering {
                    answering.wait_for_upstream();
                }
            }
            Poll::Ready(None | Some(Err(_))) => drop(this.answering.take()),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
