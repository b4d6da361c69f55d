//! Two futures run to completion on one task, each polled only when its
//! own waker fired. `tokio::join!` polls both halves whenever either is
//! woken; a session's writer is woken for every delivery, and polling its
//! reader alongside (a TLS read that finds nothing, its timers, its
//! cancellation tokens) was a sixth of the edge's CPU per delivery at
//! 1,000 subscribers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// One half's waker: marks the half as woken, then wakes the task.
#[derive(Debug, Default)]
struct Half {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Half {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.task.wake();
    }
}

/// One half: its future until it is done, then its output until taken.
struct Branch<F: Future + Unpin> {
    future: Option<F>,
    output: Option<F::Output>,
    half: Arc<Half>,
    waker: Waker,
}

impl<F: Future + Unpin> Branch<F> {
    fn new(future: F) -> Self {
        let half = Arc::new(Half {
            // Polled once at the start.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Branch {
            future: Some(future),
            output: None,
            waker: Waker::from(half.clone()),
            half,
        }
    }

    /// Polls the future if its waker fired since the last poll; true once
    /// it is done.
    fn poll(&mut self, task: &Waker) -> bool {
        let Some(future) = self.future.as_mut() else {
            return true;
        };
        self.half.task.register(task);
        if !self.half.woken.swap(false, Ordering::SeqCst) {
            return false;
        }
        let mut context = Context::from_waker(&self.waker);
        match Pin::new(future).poll(&mut context) {
            Poll::Ready(output) => {
                self.output = Some(output);
                self.future = None;
                true
            }
            Poll::Pending => false,
        }
    }
}

/// The future of [`join_woken`].
pub struct JoinWoken<A: Future + Unpin, B: Future + Unpin> {
    a: Branch<A>,
    b: Branch<B>,
}

// Nothing in it is pinned: the halves are `Unpin`, and the outputs are
// only ever moved out whole.
impl<A: Future + Unpin, B: Future + Unpin> Unpin for JoinWoken<A, B> {}

impl<A: Future + Unpin, B: Future + Unpin> std::fmt::Debug for JoinWoken<A, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinWoken")
            .field("a_done", &self.a.future.is_none())
            .field("b_done", &self.b.future.is_none())
            .finish()
    }
}

/// Runs `a` and `b` on this task and returns both outputs, polling each
/// only when something it waits on woke it (and once at the start). Pin
/// them first (`std::pin::pin!`) if they are not `Unpin`.
pub fn join_woken<A: Future + Unpin, B: Future + Unpin>(a: A, b: B) -> JoinWoken<A, B> {
    JoinWoken {
        a: Branch::new(a),
        b: Branch::new(b),
    }
}

impl<A: Future + Unpin, B: Future + Unpin> Future for JoinWoken<A, B> {
    type Output = (A::Output, B::Output);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let a_done = this.a.poll(cx.waker());
        let b_done = this.b.poll(cx.waker());
        if a_done
            && b_done
            && let (Some(a), Some(b)) = (this.a.output.take(), this.b.output.take())
        {
            return Poll::Ready((a, b));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls and finishes when told.
    struct Counted {
        polls: Arc<AtomicUsize>,
        finish: Arc<tokio::sync::Notify>,
    }

    async fn counted(counted: Counted) -> usize {
        let Counted { polls, finish } = counted;
        let mut notified = std::pin::pin!(finish.notified());
        std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::SeqCst);
            notified.as_mut().poll(cx)
        })
        .await;
        polls.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn each_half_is_polled_only_when_it_is_woken() {
        let (a_polls, b_polls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a_finish, b_finish) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let (ticks, mut ticked) = tokio::sync::mpsc::unbounded_channel::<()>();
        let b_polls_seen = b_polls.clone();
        let (a_polls_in, a_finish_in) = (a_polls.clone(), a_finish.clone());
        let a = async move {
            // Woken ten times by its own channel.
            for _ in 0..10 {
                ticked.recv().await;
            }
            counted(Counted {
                polls: a_polls_in,
                finish: a_finish_in,
            })
            .await
        };
        let b = counted(Counted {
            polls: b_polls.clone(),
            finish: b_finish.clone(),
        });
        let joined = tokio::spawn(async move {
            let (a, b) = join_woken(std::pin::pin!(a), std::pin::pin!(b)).await;
            (a, b)
        });
        for _ in 0..10 {
            ticks.send(()).unwrap();
            tokio::task::yield_now().await;
        }
        a_finish.notify_one();
        b_finish.notify_one();
        let (a_count, b_count) = joined.await.unwrap();
        assert!(a_count >= 1);
        // b: its first poll, and the one after its own wake-up; none for
        // a's ten.
        assert_eq!(b_count, 2, "b was polled for a's wake-ups");
        assert_eq!(b_polls_seen.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn both_outputs_come_back_whichever_ends_first() {
        let second = async {
            tokio::task::yield_now().await;
            "two"
        };
        let (first, second) = join_woken(std::pin::pin!(async { 1 }), std::pin::pin!(second)).await;
        assert_eq!((first, second), (1, "two"));
    }
}
