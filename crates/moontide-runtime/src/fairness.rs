//! Fair sharing of one worker thread between short calls and long, CPU-bound ones.
//!
//! Every call runs in timeslices (`sandbox::TIMESLICE_MS`): a call still running at the
//! end of its slice yields to the thread's event loop. Yielding alone is not fair: with
//! N runaway calls on a thread, a short call waits behind N slices, and the runaway
//! function takes N/(N+1) of the thread. So a call that used up a slice ("long") does not
//! go straight back to the run queue; it waits for the thread's **long lane**:
//!
//! - one long call holds the lane at a time, FIFO among long calls of this thread;
//! - every long slice adds its running time to the lane's **debt**; before the next long
//!   slice the debt is paid back by time the thread spends on other work — the holder
//!   yields (`tokio::task::yield_now`, which lets every ready task and the I/O driver run
//!   first) and counts each round's length as paid if other work made progress in it;
//! - a round in which nothing else ran means the thread is idle: the debt is forgiven and
//!   the long call runs at once, so a lone CPU-bound function keeps its full speed.
//!
//! The effect: while short calls are waiting, long calls together get at most half of the
//! thread; when nothing else waits, they get all of it. A short call (done within its
//! first slice) never touches the lane. Progress is counted per poll of any call on the
//! thread; a round longer than [`FOREIGN_WORK`] counts as other work too (I/O that runs no
//! Lua, such as proxying).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// A yield round longer than this counts as other work even if no call was polled in it.
pub const FOREIGN_WORK: Duration = Duration::from_micros(50);

/// The most debt the lane carries: one slice that could not yield (a long C call) must not
/// shut long calls out for longer than a few slices.
const MAX_DEBT: Duration = Duration::from_millis(8);

#[derive(Default)]
struct Lane {
    /// Long-call running time not yet paid back by other work.
    debt: Duration,
    /// The seat holding the lane.
    holder: Option<u64>,
    /// Seats waiting for the lane, in arrival order.
    queue: VecDeque<(u64, Waker)>,
    next_seat: u64,
    /// Polls of calls on this thread (the progress of other work).
    progress: u64,
    /// Times the debt was forgiven because the thread was idle.
    forgiven: u64,
}

impl Lane {
    fn wake_head(&self) {
        if self.holder.is_none()
            && let Some((_, waker)) = self.queue.front()
        {
            waker.wake_by_ref();
        }
    }
}

thread_local! {
    static LANE: RefCell<Lane> = RefCell::new(Lane::default());
}

/// Records that a call on this thread is about to run Lua.
pub(crate) fn note_poll() {
    LANE.with(|lane| lane.borrow_mut().progress += 1);
}

/// One call's place in its thread's long lane.
pub(crate) struct Seat {
    id: u64,
}

impl Seat {
    pub fn new() -> Seat {
        let id = LANE.with(|lane| {
            let mut lane = lane.borrow_mut();
            lane.next_seat += 1;
            lane.next_seat
        });
        Seat { id }
    }

    /// Called after the call used up a slice that ran for `ran`: hands the lane on, waits
    /// for the lane, and waits until the thread's other work has had its share.
    pub async fn after_slice(&mut self, ran: Duration) {
        LANE.with(|lane| {
            let mut lane = lane.borrow_mut();
            lane.debt = (lane.debt + ran).min(MAX_DEBT);
        });
        self.release();
        poll_fn(|cx| self.try_take_lane(cx.waker())).await;
        loop {
            let (debt, progress) = LANE.with(|lane| {
                let lane = lane.borrow();
                (lane.debt, lane.progress)
            });
            if debt.is_zero() {
                return;
            }
            let started = Instant::now();
            tokio::task::yield_now().await;
            let round = started.elapsed();
            LANE.with(|lane| {
                let mut lane = lane.borrow_mut();
                let others_ran = lane.progress != progress || round > FOREIGN_WORK;
                if others_ran {
                    lane.debt = lane.debt.saturating_sub(round);
                } else {
                    lane.debt = Duration::ZERO;
                    lane.forgiven += 1;
                }
            });
        }
    }

    /// Gives the lane up (the call finished, or waits on I/O rather than the CPU).
    pub fn release(&mut self) {
        LANE.with(|lane| {
            let mut lane = lane.borrow_mut();
            if lane.holder == Some(self.id) {
                lane.holder = None;
                lane.wake_head();
            }
        });
    }

    fn try_take_lane(&self, waker: &Waker) -> Poll<()> {
        LANE.with(|lane| {
            let mut lane = lane.borrow_mut();
            let at_head = lane.queue.front().is_none_or(|(id, _)| *id == self.id);
            if lane.holder.is_none() && at_head {
                if !lane.queue.is_empty() {
                    lane.queue.pop_front();
                }
                lane.holder = Some(self.id);
                return Poll::Ready(());
            }
            match lane.queue.iter_mut().find(|(id, _)| *id == self.id) {
                Some((_, queued)) => queued.clone_from(waker),
                None => lane.queue.push_back((self.id, waker.clone())),
            }
            Poll::Pending
        })
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        LANE.with(|lane| {
            let mut lane = lane.borrow_mut();
            if lane.holder == Some(self.id) {
                lane.holder = None;
            }
            lane.queue.retain(|(id, _)| *id != self.id);
            lane.wake_head();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_thread_forgives_the_debt() {
        let forgiven = || LANE.with(|lane| lane.borrow().forgiven);
        let before = forgiven();
        let mut seat = Seat::new();
        seat.after_slice(Duration::from_millis(5)).await;
        // Nothing else ran: the long call went on without waiting for other work.
        assert_eq!(forgiven(), before + 1);
        seat.release();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_lane_is_held_by_one_long_call_at_a_time_in_order() {
        let local = tokio::task::LocalSet::new();
        let order = Rc::new(RefCell::new(Vec::new()));
        local
            .run_until(async {
                let mut first = Seat::new();
                first.after_slice(Duration::ZERO).await; // holds the lane
                let mut tasks = Vec::new();
                for n in 0..3 {
                    let order = order.clone();
                    tasks.push(tokio::task::spawn_local(async move {
                        let mut seat = Seat::new();
                        seat.after_slice(Duration::ZERO).await;
                        order.borrow_mut().push(n);
                        tokio::task::yield_now().await;
                        order.borrow_mut().push(n + 10);
                        drop(seat);
                    }));
                }
                tokio::task::yield_now().await;
                assert!(order.borrow().is_empty(), "the lane is held");
                drop(first);
                for task in tasks {
                    task.await.unwrap();
                }
            })
            .await;
        // Each holder finished its turn before the next one started, in arrival order.
        assert_eq!(*order.borrow(), vec![0, 10, 1, 11, 2, 12]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn debt_is_paid_by_other_work() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                // Other work: a task that keeps making progress for ~3 ms.
                let worker = tokio::task::spawn_local(async {
                    let until = Instant::now() + Duration::from_millis(3);
                    while Instant::now() < until {
                        note_poll();
                        std::thread::sleep(Duration::from_micros(200));
                        tokio::task::yield_now().await;
                    }
                });
                let mut seat = Seat::new();
                let started = Instant::now();
                seat.after_slice(Duration::from_millis(2)).await;
                let waited = started.elapsed();
                assert!(
                    waited >= Duration::from_millis(2),
                    "the long call waited for other work to get its share: {waited:?}"
                );
                worker.await.unwrap();
            })
            .await;
    }
}
