//! Zero-copy blob responses on plain-TCP connections.
//!
//! hyper only writes byte buffers, so a stored blob is handed to it as a read-only memory
//! mapping of the file. The connection's socket ([`Socket`]) knows which address ranges are
//! such mappings ([`Regions`]) and sends them with `sendfile(2)` instead of copying them out:
//! the kernel moves page-cache pages to the socket, the mapping is never touched, and the
//! process's RSS stays flat however big the blob and however many the clients. Every other
//! write (headers, small bodies) is an ordinary one, and since a mapping holds the file's
//! own bytes, a write that does copy from it is still correct, only slower.

use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The blob mappings a connection's responses currently hold.
#[derive(Default)]
pub struct Regions(Mutex<Vec<Region>>);

struct Region {
    start: usize,
    len: usize,
    file: Arc<File>,
    offset: u64,
}

impl Regions {
    fn lock(&self) -> MutexGuard<'_, Vec<Region>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Maps `len` (> 0) bytes of the blob file `file` from `offset`. The mapping stays
    /// registered until the returned bytes, and every slice of them, are dropped.
    ///
    /// Only for files that never shrink (reading a mapping past the end of its file faults
    /// the process): stored blobs are never written again, and a download's spool only
    /// grows (a failed one is unlinked, not truncated). The length is checked here all
    /// the same.
    pub fn map(self: &Arc<Self>, file: Arc<File>, offset: u64, len: usize) -> io::Result<Bytes> {
        if file.metadata()?.len() < offset + len as u64 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob shorter than expected"));
        }
        // SAFETY: the file never shrinks (see above) and is long enough.
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map(&*file)? };
        self.lock().push(Region { start: map.as_ptr() as usize, len, file, offset });
        Ok(Bytes::from_owner(Mapping { map, regions: self.clone() }))
    }

    /// Which of `bufs` is the first that lies inside a registered mapping, with its file and
    /// the file offset of its first byte.
    fn first_mapped(&self, bufs: &[IoSlice<'_>]) -> Option<(usize, Arc<File>, u64)> {
        let regions = self.lock();
        if regions.is_empty() {
            return None;
        }
        bufs.iter().enumerate().filter(|(_, b)| !b.is_empty()).find_map(|(i, b)| {
            let p = b.as_ptr() as usize;
            let r = regions.iter().find(|r| p >= r.start && p + b.len() <= r.start + r.len)?;
            Some((i, r.file.clone(), r.offset + (p - r.start) as u64))
        })
    }
}

/// The owner of a mapping behind [`Bytes`]: unregisters it before it is unmapped.
struct Mapping {
    map: memmap2::Mmap,
    regions: Arc<Regions>,
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let start = self.map.as_ptr() as usize;
        self.regions.lock().retain(|r| r.start != start);
    }
}

/// A TCP connection whose writes of registered mappings go out by `sendfile(2)`.
pub struct Socket {
    tcp: TcpStream,
    regions: Arc<Regions>,
    /// Bytes read from the connection but not consumed, handed out before the socket's.
    unread: Bytes,
}

impl Socket {
    pub fn new(tcp: TcpStream) -> Self {
        Socket { tcp, regions: Arc::default(), unread: Bytes::new() }
    }

    /// Puts `bytes` back in front of what the connection sends next.
    pub fn unread(&mut self, bytes: Bytes) {
        debug_assert!(self.unread.is_empty(), "unread twice without a read");
        self.unread = bytes;
    }

    /// Waits, holding no buffer, until the client has sent something (or closed).
    pub async fn readable(&self) -> io::Result<()> {
        if self.unread.is_empty() {
            self.tcp.readable().await?;
        }
        Ok(())
    }

    /// Copies the first bytes the client sent without consuming them.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.unread.is_empty() {
            let n = buf.len().min(self.unread.len());
            buf[..n].copy_from_slice(&self.unread[..n]);
            return Ok(n);
        }
        self.tcp.peek(buf).await
    }

    /// The registry that responses on this connection map their blobs into.
    pub fn regions(&self) -> Arc<Regions> {
        self.regions.clone()
    }

    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        file: &File,
        mut offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.tcp, file, Some(&mut offset), len).map_err(io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = buf.remaining().min(this.unread.len());
            buf.put_slice(&this.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Leading ordinary buffers go out in one `writev`; a mapped buffer goes alone, by
    /// `sendfile`. The caller advances by what was written and calls again for the rest.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let lead = bufs.iter().position(|b| !b.is_empty()).unwrap_or(0);
        let plain = match this.regions.first_mapped(bufs) {
            Some((i, file, offset)) if i == lead => {
                return this.poll_sendfile(cx, &file, offset, bufs[i].len())
            }
            Some((i, ..)) => &bufs[..i],
            None => bufs,
        };
        Pin::new(&mut this.tcp).poll_write_vectored(cx, plain)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(len: usize) -> (Arc<File>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        std::fs::write(&path, (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>()).expect("write");
        (Arc::new(File::open(&path).expect("open")), dir)
    }

    #[test]
    fn slices_of_a_mapping_are_found_with_their_file_offset_until_dropped() {
        let (file, _dir) = blob(3 * 4096 + 10);
        let regions = Arc::new(Regions::default());
        let bytes = regions.map(file, 4096 + 5, 8000).expect("map");
        assert_eq!(bytes[0], ((4096 + 5) % 251) as u8, "the mapping holds the file's bytes");
        let part = bytes.slice(100..200);
        let other = vec![1u8; 16];
        {
            let bufs = [IoSlice::new(&[]), IoSlice::new(&other), IoSlice::new(&part)];
            let (i, _, offset) = regions.first_mapped(&bufs).expect("found");
            assert_eq!((i, offset), (2, 4096 + 5 + 100));
            assert!(regions.first_mapped(&bufs[..2]).is_none(), "ordinary buffers are not mapped");
        }
        drop((bytes, part));
        assert!(regions.lock().is_empty(), "dropping the last slice unregisters the mapping");
    }

    #[test]
    fn a_range_past_the_end_of_the_file_is_refused() {
        let (file, _dir) = blob(1000);
        let regions = Arc::new(Regions::default());
        let err = regions.map(file, 500, 501).expect_err("too long");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(regions.lock().is_empty());
    }
}
