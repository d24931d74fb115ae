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

/// A channel and the body it feeds.
pub fn channel(depth: usize) -> (mpsc::Sender<io::Result<Bytes>>, Body) {
    let (tx, rx) = mpsc::channel(depth);
    (tx, ChannelBody { rx }.boxed_unsync())
}
