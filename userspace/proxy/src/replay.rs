//! Request bodies that can be sent again. A retried request streams its body upstream as it
//! arrives while a copy is kept, up to a bound; a later try sends the copy, then whatever of
//! the body the failed try had not read yet. Nothing waits for the whole body before the first
//! try (a streaming call that waits on its answer before sending more would never finish),
//! and a body of unknown length (chunked, or HTTP/2 without content-length, as gRPC clients
//! send) is retried like one of known length. Once the copy would pass the bound, it is dropped
//! and the request can no longer be retried.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, SizeHint};

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// The original body and the copy of what has been read of it.
struct Shared {
    body: Body,
    /// The data frames read so far, while they fit in `max`.
    copy: Vec<Bytes>,
    copied: u64,
    max: u64,
    /// The copy passed `max` and was dropped: what was sent is kept nowhere.
    overflowed: bool,
    ended: bool,
    trailers: Option<HeaderMap>,
    /// The try whose body may read: a failed try's body may still be polled for a while by its
    /// connection, and must not take frames from the next.
    current: u64,
}

/// A request body for as many tries as its copy allows.
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
    hint: SizeHint,
}

impl Replay {
    pub fn new(body: Body, max: u64) -> Replay {
        let hint = body.size_hint();
        let shared = Shared {
            body,
            copy: Vec::new(),
            copied: 0,
            max,
            overflowed: false,
            ended: false,
            trailers: None,
            current: 0,
        };
        Replay { shared: Arc::new(Mutex::new(shared)), hint }
    }

    /// The body of the next try, from the start; `None` once the copy overflowed.
    pub fn next_try(&self) -> Option<Body> {
        let mut shared = lock(&self.shared);
        if shared.overflowed {
            return None;
        }
        shared.current += 1;
        let body =
            Try { shared: self.shared.clone(), id: shared.current, next: 0, trailers_sent: false, hint: self.hint };
        Some(body.boxed())
    }

    /// Whether another try could send the whole body again.
    pub fn replayable(&self) -> bool {
        !lock(&self.shared).overflowed
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One try's view: the copy from `next`, then the original's frames.
struct Try {
    shared: Arc<Mutex<Shared>>,
    id: u64,
    /// The next frame of the copy to send.
    next: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

impl hyper::body::Body for Try {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut shared = lock(&this.shared);
        if shared.current != this.id {
            // A later try took over.
            return Poll::Ready(None);
        }
        if let Some(data) = shared.copy.get(this.next) {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
        }
        if shared.ended {
            return Poll::Ready(match (&shared.trailers, this.trailers_sent) {
                (Some(trailers), false) => {
                    this.trailers_sent = true;
                    Some(Ok(Frame::trailers(trailers.clone())))
                }
                _ => None,
            });
        }
        let frame = match Pin::new(&mut shared.body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(frame) => frame,
        };
        match &frame {
            None => shared.ended = true,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    shared.copied += data.len() as u64;
                    if shared.copied <= shared.max && !shared.overflowed {
                        shared.copy.push(data.clone());
                        this.next = shared.copy.len();
                    } else if !shared.overflowed {
                        shared.overflowed = true;
                        shared.copy = Vec::new();
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    shared.trailers = Some(trailers.clone());
                    this.trailers_sent = true;
                }
            }
            Some(Err(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::VecDeque;

    use super::*;
    use http_body_util::Full;

    /// A body of unknown length, one frame a chunk.
    struct Chunks(VecDeque<&'static str>);

    impl hyper::body::Body for Chunks {
        type Data = Bytes;
        type Error = hyper::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))))
        }
    }

    fn chunks(parts: &[&'static str]) -> Body {
        Chunks(parts.iter().copied().collect()).boxed()
    }

    async fn read_all(body: Body) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_failed_try_is_sent_again_from_the_copy_then_the_rest() {
        let replay = Replay::new(chunks(&["ab", "cd", "ef"]), 64);
        // The first try reads one frame and fails.
        let mut first = replay.next_try().unwrap();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        // The second sends all of it: the copy, then what the first never read.
        let second = replay.next_try().unwrap();
        assert!(first.frame().await.is_none(), "the failed try reads nothing more");
        assert_eq!(read_all(second).await, b"abcdef");
        assert!(replay.replayable());
        assert_eq!(read_all(replay.next_try().unwrap()).await, b"abcdef", "and again, all from the copy");
    }

    #[tokio::test]
    async fn past_the_bound_it_streams_and_cannot_be_sent_again() {
        let replay = Replay::new(chunks(&["0123", "4567", "89"]), 6);
        assert_eq!(read_all(replay.next_try().unwrap()).await, b"0123456789", "the first try gets everything");
        assert!(!replay.replayable());
        assert!(replay.next_try().is_none());
    }

    #[tokio::test]
    async fn the_size_is_known_on_every_try() {
        let replay = Replay::new(Full::new(Bytes::from_static(b"hello")).map_err(|never| match never {}).boxed(), 64);
        for _ in 0..2 {
            let body = replay.next_try().unwrap();
            assert_eq!(body.size_hint().exact(), Some(5));
            assert_eq!(read_all(body).await, b"hello");
        }
    }
}
