//! A future polled only when its own waker fired.
//!
//! A connection's task waits on hyper's connection and on its timers (the
//! timeouts of [`super::activity`], shutdown) at once. `select!` polls every
//! branch whenever the task wakes, and hyper wakes it at least twice a
//! request: each time the timers' `Notify`s and `Sleep` were polled again
//! for nothing, about 900 instructions a request (BENCHMARKS.md, issue 23).
//! Behind [`Woken`] the timers get a waker of their own, which marks them
//! woken before it wakes the task, and they are polled only then.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

pin_project_lite::pin_project! {
    /// `future`, polled on its first poll and then only after it woke;
    /// `waker` is `flag` as a waker, made once.
    pub(super) struct Woken<F> {
        #[pin]
        future: F,
        flag: Arc<Flag>,
        waker: Waker,
    }
}

/// What `future` registers as its waker.
struct Flag {
    /// Set by a wake, taken by the next poll.
    woken: AtomicBool,
    /// The task that polls [`Woken`].
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> Woken<F> {
    pub(super) fn new(future: F) -> Self {
        let flag = Arc::new(Flag { woken: AtomicBool::new(true), task: AtomicWaker::new() });
        Self { future, waker: Waker::from(flag.clone()), flag }
    }
}

impl<F: Future> Future for Woken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read: a wake in between is not lost.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.future.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts its polls; ready once `ready` is set, after waking itself.
    struct Probe {
        polls: Arc<AtomicUsize>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
        ready: Arc<AtomicBool>,
    }

    impl Future for Probe {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn the_inner_future_is_polled_first_and_then_only_after_its_wake() {
        let polls = Arc::new(AtomicUsize::new(0));
        let inner_waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let ready = Arc::new(AtomicBool::new(false));
        let probe = Probe { polls: polls.clone(), waker: inner_waker.clone(), ready: ready.clone() };
        let mut woken = Box::pin(Woken::new(probe));
        let task_wakes = Arc::new(WakeCount::default());
        let task_waker = Waker::from(task_wakes.clone());
        let mut cx = Context::from_waker(&task_waker);

        assert!(woken.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "the first poll reaches the inner future");
        for _ in 0..3 {
            assert!(woken.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "wakes of the task alone do not");

        ready.store(true, Ordering::SeqCst);
        inner_waker.lock().unwrap().take().expect("the inner future kept a waker").wake();
        assert_eq!(task_wakes.0.load(Ordering::SeqCst), 1, "the inner wake wakes the task");
        assert!(woken.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[derive(Default)]
    struct WakeCount(AtomicUsize);

    impl Wake for WakeCount {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}
