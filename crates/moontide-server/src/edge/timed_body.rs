//! A request body whose every read must make progress within a timeout: [`TimedBody`]
//! wraps any `http_body::Body` and fails with [`BodyTimeout`] when the next frame does
//! not arrive in time. The timer restarts at each frame, so a slow upload that keeps
//! moving is never cut; one that stops (a `Content-Length` larger than what is sent, a
//! chunked body that never ends) is.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The client sent no more of the body within the per-read timeout.
#[derive(Debug, thiserror::Error)]
#[error("no more of the request body arrived within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// `inner` with a timeout on each wait for its next frame.
pub struct TimedBody<B> {
    inner: B,
    sleep: Pin<Box<Sleep>>,
    timeout: Duration,
    /// Whether `sleep` is armed for the current wait.
    armed: bool,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Duration) -> TimedBody<B> {
        TimedBody {
            inner,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            armed: false,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body + Unpin,
    B::Data: Buf,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|result| result.map_err(Into::into)));
        }
        if !this.armed {
            // The wait for this frame starts now.
            let deadline = Instant::now() + this.timeout;
            this.sleep.as_mut().reset(deadline);
            this.armed = true;
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `error` (as a body read reports it, possibly wrapped) is a [`BodyTimeout`].
pub fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<BodyTimeout>() {
            return true;
        }
        current = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that sends one frame, then waits forever.
    struct Stalls(bool);

    impl Body for Stalls {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            if self.0 {
                Poll::Pending
            } else {
                self.0 = true;
                Poll::Ready(Some(Ok(Frame::data(bytes::Bytes::from_static(b"hello")))))
            }
        }
    }

    #[tokio::test]
    async fn a_stalled_body_times_out_after_its_last_frame() {
        let body = TimedBody::new(Stalls(false), Duration::from_millis(50));
        let error = body.collect().await.expect_err("the body stalls");
        assert!(is_timeout(error.as_ref()), "{error}");
    }

    #[tokio::test]
    async fn a_complete_body_is_read_whole() {
        let body = TimedBody::new(
            http_body_util::Full::new(bytes::Bytes::from_static(b"abc")),
            Duration::from_secs(5),
        );
        let bytes = body.collect().await.expect("whole").to_bytes();
        assert_eq!(&bytes[..], b"abc");
    }
}
