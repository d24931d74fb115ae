//! Response bodies: whole buffers, or chunks from a channel fed by a file reader or a fill.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use tokio::sync::mpsc;

pub type Body = UnsyncBoxBody<Bytes, io::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body fed through a bounded channel; an `Err` item aborts the response, so the client
/// sees a cut transfer instead of a complete one.
pub struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// A body from a stream of chunks; an `Err` item aborts the response.
pub fn stream(s: impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static) -> Body {
    use futures_util::StreamExt;
    http_body_util::StreamBody::new(s.map(|r| r.map(Frame::data))).boxed_unsync()
}

/// A channel and the body it feeds.
pub fn channel(depth: usize) -> (mpsc::Sender<io::Result<Bytes>>, Body) {
    let (tx, rx) = mpsc::channel(depth);
    (tx, ChannelBody { rx }.boxed_unsync())
}

/// Bytes per read when streaming a stored file.
const FILE_CHUNK: usize = 256 * 1024;

/// A body reading `len` bytes of `file` from `start`. Each chunk is read on the blocking
/// pool when the body is polled, and the next one while it is on its way: a client that
/// stops reading holds at most two chunks, never a thread, and a response never polled
/// (an HTTP/2 stream without flow-control window) holds nothing.
pub fn file(file: std::fs::File, start: u64, len: u64, on_chunk: impl Fn(u64) + Send + 'static) -> Body {
    let file = std::sync::Arc::new(file);
    let end = start + len;
    let read = move |off: u64| {
        let file = file.clone();
        let want = (end - off).min(FILE_CHUNK as u64) as usize;
        tokio::task::spawn_blocking(move || crate::cache::read_at(&file, off, want))
    };
    let chunks = futures_util::stream::unfold((start, None), move |(off, ahead)| {
        let read = read.clone();
        async move {
            if off >= end {
                return None;
            }
            let chunk = match ahead.unwrap_or_else(|| read(off)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Some((Err(e), (end, None))),
                Err(e) => return Some((Err(io::Error::other(e.to_string())), (end, None))),
            };
            let after = off + chunk.len() as u64;
            let ahead = (after < end).then(|| read(after));
            Some((Ok(chunk), (after, ahead)))
        }
    });
    let counted = futures_util::StreamExt::inspect(chunks, move |c| {
        if let Ok(c) = c {
            on_chunk(c.len() as u64)
        }
    });
    stream(counted)
}

/// Bytes per chunk of a mapped body: the unit of read-ahead and of byte accounting.
const MAPPED_CHUNK: usize = 4 * 1024 * 1024;

/// A body sending `len` (> 0) bytes of the blob file `file` from `start` as slices of one
/// mapping registered in `regions`, so the connection sends them with `sendfile` (see
/// [`crate::zerocopy`]). No thread and no buffer per response: read-ahead is asked for
/// one chunk ahead of the one handed to hyper.
pub fn mapped(
    regions: &std::sync::Arc<crate::zerocopy::Regions>,
    file: std::fs::File,
    start: u64,
    len: u64,
    on_chunk: impl Fn(u64) + Send + Unpin + 'static,
) -> io::Result<Body> {
    let file = std::sync::Arc::new(file);
    let len = usize::try_from(len).map_err(io::Error::other)?;
    let whole = regions.map(file.clone(), start, len)?;
    let body = MappedBody { whole, sent: 0, file, start, on_chunk };
    body.read_ahead(0);
    Ok(body.boxed_unsync())
}

struct MappedBody<F> {
    whole: Bytes,
    sent: usize,
    file: std::sync::Arc<std::fs::File>,
    start: u64,
    on_chunk: F,
}

impl<F> MappedBody<F> {
    /// Starts reading the chunk at `at` into the page cache, so that `sendfile` on a
    /// worker thread rarely waits for the disk. Only advice: errors are ignored.
    fn read_ahead(&self, at: usize) {
        let n = MAPPED_CHUNK.min(self.whole.len().saturating_sub(at));
        if let (Some(n), true) = (std::num::NonZeroU64::new(n as u64), at < self.whole.len()) {
            let _ = rustix::fs::fadvise(
                &*self.file,
                self.start + at as u64,
                Some(n),
                rustix::fs::Advice::WillNeed,
            );
        }
    }
}

impl<F: Fn(u64) + Unpin> http_body::Body for MappedBody<F> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let at = this.sent;
        if at == this.whole.len() {
            return Poll::Ready(None);
        }
        let n = MAPPED_CHUNK.min(this.whole.len() - at);
        this.sent += n;
        this.read_ahead(this.sent);
        (this.on_chunk)(n as u64);
        Poll::Ready(Some(Ok(Frame::data(this.whole.slice(at..at + n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == self.whole.len()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact((self.whole.len() - self.sent) as u64)
    }
}
