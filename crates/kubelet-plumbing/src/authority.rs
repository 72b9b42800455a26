//! Any `:authority` on a Unix socket.
//!
//! h2, under tonic, parses a request's `:authority` as a URI authority and
//! resets the stream with `PROTOCOL_ERROR` when it does not parse (h2
//! 0.4.20 `server.rs`, "malformed authority"). Clients of a Unix socket send
//! whatever their stack derives from the socket path: grpc-go in the
//! kubelets before 1.26 sent the raw path (kubernetes PR 112597 moved the
//! kubelet to `localhost`), grpc-core ≥ 1.57 sends the percent-encoded
//! path, grpc-java the path. None of these parse, so a plain tonic server
//! cannot be registered by those kubelets (tonic issue 243, h2 issue 442).
//!
//! The fix lives below h2, on the bytes: [`AnyAuthority`] wraps an accepted
//! connection, follows the client's HTTP/2 frames, and re-encodes every
//! header block (HEADERS plus CONTINUATION) with a well-kept HPACK codec
//! (`loona-hpack`): an `:authority` that h2 would refuse is dropped (an
//! absent `:authority` is valid HTTP/2), everything else passes unchanged.
//! The decoder follows the client's dynamic table; the encoder towards h2
//! never references its own dynamic table, so the two tables cannot drift.
//! DATA and every other frame pass through as they are.
//!
//! A connection whose frames cannot be followed (bad padding, a header
//! block that does not decode, CONTINUATION out of place, a block over
//! [`MAX_HEADER_BLOCK`]) ends with an I/O error: that connection closes and
//! the server keeps serving the others, as HTTP/2 treats these as
//! connection errors anyway.
//!
//! [`SendAuthority`] is the same machinery on a client's write side: it
//! sets the `:authority` a client sends, so an emulator can dial like a
//! kubelet of a given version, which tonic's own client cannot.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface.
const PREFACE_LEN: usize = 24;
/// A frame header.
const FRAME_HEADER_LEN: usize = 9;
/// Frame types (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
/// Frame flags.
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's
/// initial value): re-encoded blocks are cut into frames no larger.
const MIN_MAX_FRAME: usize = 16_384;
/// SETTINGS_HEADER_TABLE_SIZE's initial value; h2's server does not
/// advertise another, so no client may grow its table past it.
const HEADER_TABLE_SIZE: usize = 4_096;
/// The largest header block followed (h2's own default limit on a decoded
/// header list is 16 KiB; this leaves h2 to refuse what is merely large).
pub const MAX_HEADER_BLOCK: usize = 1 << 20;

/// Why a connection's frames could not be followed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A header block did not decode.
    #[error("header block of stream {stream} does not decode")]
    Hpack {
        /// The stream.
        stream: u32,
        /// The decoder's error.
        #[source]
        source: loona_hpack::decoder::DecoderError,
    },
    /// The padding length is larger than the frame.
    #[error("frame of type {kind:#x} on stream {stream} has more padding than payload")]
    Padding {
        /// The frame type.
        kind: u8,
        /// The stream.
        stream: u32,
    },
    /// A CONTINUATION frame where none may stand, or another frame where
    /// one must.
    #[error(
        "frame of type {kind:#x} on stream {stream} where a CONTINUATION of stream {expected:?} was due"
    )]
    Continuation {
        /// The frame type.
        kind: u8,
        /// The stream.
        stream: u32,
        /// The stream whose block is open, if any.
        expected: Option<u32>,
    },
    /// A client sent PUSH_PROMISE (only servers may).
    #[error("PUSH_PROMISE from a client on stream {0}")]
    PushPromise(u32),
    /// A header block grew past [`MAX_HEADER_BLOCK`].
    #[error("header block of stream {stream} exceeds {MAX_HEADER_BLOCK} bytes")]
    TooLarge {
        /// The stream.
        stream: u32,
    },
}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// What happens to a request's `:authority`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthorityRule {
    /// Keep it when it parses as a URI authority, drop it otherwise (what a
    /// server needs in front of h2).
    DropInvalid,
    /// Send this value, whatever the client's stack chose.
    Set(Vec<u8>),
    /// Send none.
    Remove,
}

impl AuthorityRule {
    fn apply(&self, value: Vec<u8>) -> Option<Vec<u8>> {
        match self {
            Self::DropInvalid => http::uri::Authority::try_from(value.as_slice())
                .is_ok()
                .then_some(value),
            Self::Set(v) => Some(v.clone()),
            Self::Remove => None,
        }
    }
}

enum Phase {
    /// Collecting a frame header.
    FrameHeader,
    /// Passing bytes through unchanged (a frame's payload, or the
    /// connection preface at the start): bytes left.
    Pass(usize),
    /// Collecting a HEADERS or CONTINUATION payload: bytes left.
    Collect(usize),
}

/// A header block being collected.
struct Block {
    stream: u32,
    /// END_STREAM and PRIORITY of the opening HEADERS frame.
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The sans-I/O core: client-to-server bytes in, rewritten bytes out.
pub(crate) struct Rewriter {
    rule: AuthorityRule,
    phase: Phase,
    header: [u8; FRAME_HEADER_LEN],
    have: usize,
    /// The frame being collected: type, flags, stream, payload so far.
    frame: (u8, u8, u32, Vec<u8>),
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
}

impl Rewriter {
    pub(crate) fn new(rule: AuthorityRule) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        let mut encoder = loona_hpack::Encoder::new();
        // Entries still go into the peer's table (literal with indexing),
        // but this encoder never refers to one: nothing to keep in step.
        encoder.set_max_table_size(0);
        Self {
            rule,
            phase: Phase::Pass(PREFACE_LEN),
            header: [0; FRAME_HEADER_LEN],
            have: 0,
            frame: (0, 0, 0, Vec::new()),
            block: None,
            decoder,
            encoder,
        }
    }

    /// Consumes `input`, appending what the server should read to `out`.
    pub(crate) fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
        while !input.is_empty() {
            match self.phase {
                Phase::Pass(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.phase = if n == left {
                        Phase::FrameHeader
                    } else {
                        Phase::Pass(left - n)
                    };
                }
                Phase::FrameHeader => {
                    let n = (FRAME_HEADER_LEN - self.have).min(input.len());
                    self.header[self.have..self.have + n].copy_from_slice(&input[..n]);
                    self.have += n;
                    input = &input[n..];
                    if self.have == FRAME_HEADER_LEN {
                        self.have = 0;
                        self.start_frame(out)?;
                    }
                }
                Phase::Collect(left) => {
                    let n = left.min(input.len());
                    self.frame.3.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if n == left {
                        self.phase = Phase::FrameHeader;
                        self.end_frame(out)?;
                    } else {
                        self.phase = Phase::Collect(left - n);
                    }
                }
            }
        }
        Ok(())
    }

    fn start_frame(&mut self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let h = self.header;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let open = self.block.as_ref().map(|b| b.stream);
        match (kind, open) {
            (CONTINUATION, Some(s)) if s == stream => {}
            (CONTINUATION, _) | (_, Some(_)) => {
                return Err(FrameError::Continuation {
                    kind,
                    stream,
                    expected: open,
                });
            }
            (PUSH_PROMISE, None) => return Err(FrameError::PushPromise(stream)),
            (HEADERS, None) => {}
            _ => {
                out.extend_from_slice(&h);
                self.phase = if len == 0 {
                    Phase::FrameHeader
                } else {
                    Phase::Pass(len)
                };
                return Ok(());
            }
        }
        let collected = self.block.as_ref().map_or(0, |b| b.fragment.len());
        if collected.saturating_add(len) > MAX_HEADER_BLOCK {
            return Err(FrameError::TooLarge { stream });
        }
        self.frame = (kind, flags, stream, Vec::with_capacity(len));
        if len == 0 {
            self.end_frame(out)
        } else {
            self.phase = Phase::Collect(len);
            Ok(())
        }
    }

    fn end_frame(&mut self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let (kind, flags, stream, payload) = std::mem::take(&mut self.frame);
        if kind == HEADERS {
            let mut body = payload.as_slice();
            let mut pad = 0;
            if flags & PADDED != 0 {
                let (&p, rest) = body
                    .split_first()
                    .ok_or(FrameError::Padding { kind, stream })?;
                pad = usize::from(p);
                body = rest;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let (p, rest) = body
                    .split_first_chunk::<5>()
                    .ok_or(FrameError::Padding { kind, stream })?;
                priority = Some(*p);
                body = rest;
            }
            let end = body
                .len()
                .checked_sub(pad)
                .ok_or(FrameError::Padding { kind, stream })?;
            self.block = Some(Block {
                stream,
                flags: flags & (END_STREAM | PRIORITY),
                priority,
                fragment: body[..end].to_vec(),
            });
        } else if let Some(block) = self.block.as_mut() {
            block.fragment.extend_from_slice(&payload);
        }
        if flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.emit(block, out)?;
        }
        Ok(())
    }

    fn emit(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let stream = block.stream;
        let mut fields = Vec::new();
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                fields.push((name.into_owned(), value.into_owned()));
            })
            .map_err(|source| FrameError::Hpack { stream, source })?;
        let fields: Vec<(Vec<u8>, Vec<u8>)> = fields
            .into_iter()
            .filter_map(|(name, value)| {
                if name == b":authority" {
                    self.rule.apply(value).map(|v| (name, v))
                } else {
                    Some((name, value))
                }
            })
            .collect();
        let mut fields = fields;
        // A rule that sets an authority sets it where the client sent none.
        if let AuthorityRule::Set(v) = &self.rule
            && fields.iter().any(|(n, _)| n == b":method")
            && !fields.iter().any(|(n, _)| n == b":authority")
        {
            let at = fields
                .iter()
                .position(|(n, _)| !n.starts_with(b":"))
                .unwrap_or(fields.len());
            fields.insert(at, (b":authority".to_vec(), v.clone()));
        }
        let encoded = self
            .encoder
            .encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let prefix = block.priority.map_or(0, |_| 5);
        let first = encoded.len().min(MIN_MAX_FRAME - prefix);
        let (head, mut rest) = encoded.split_at(first);
        let mut flags = block.flags;
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        write_frame_header(out, prefix + head.len(), HEADERS, flags, stream);
        if let Some(p) = block.priority {
            out.extend_from_slice(&p);
        }
        out.extend_from_slice(head);
        while !rest.is_empty() {
            let n = rest.len().min(MIN_MAX_FRAME);
            let (chunk, tail) = rest.split_at(n);
            let flags = if tail.is_empty() { END_HEADERS } else { 0 };
            write_frame_header(out, n, CONTINUATION, flags, stream);
            out.extend_from_slice(chunk);
            rest = tail;
        }
        Ok(())
    }
}

fn write_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// Rewritten bytes waiting to be handed on.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    at: usize,
}

impl Pending {
    fn left(&self) -> &[u8] {
        &self.bytes[self.at..]
    }

    fn advance(&mut self, n: usize) {
        self.at += n;
        if self.at == self.bytes.len() {
            self.bytes.clear();
            self.at = 0;
        }
    }
}

/// A server-side connection that accepts any `:authority` (see the module
/// docs). Serve it with tonic's `serve_with_incoming`.
pub struct AnyAuthority<S> {
    inner: S,
    rewriter: Rewriter,
    pending: Pending,
    scratch: Box<[u8]>,
    eof: bool,
}

impl<S> std::fmt::Debug for AnyAuthority<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnyAuthority").finish_non_exhaustive()
    }
}

impl<S> AnyAuthority<S> {
    /// Wraps an accepted connection.
    #[must_use]
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(AuthorityRule::DropInvalid),
            pending: Pending::default(),
            scratch: vec![0; MIN_MAX_FRAME].into_boxed_slice(),
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AnyAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            let left = me.pending.left();
            if !left.is_empty() {
                let n = left.len().min(buf.remaining());
                buf.put_slice(&left[..n]);
                me.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if me.eof {
                return Poll::Ready(Ok(()));
            }
            let mut raw = ReadBuf::new(&mut me.scratch);
            ready!(Pin::new(&mut me.inner).poll_read(cx, &mut raw))?;
            let got = raw.filled();
            if got.is_empty() {
                me.eof = true;
                continue;
            }
            me.rewriter.feed(got, &mut me.pending.bytes)?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AnyAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A client-side connection whose requests carry the `:authority` its
/// rule says, whatever the HTTP/2 client above it chose.
pub struct SendAuthority<S> {
    inner: S,
    /// None: the bytes pass as they are.
    rewriter: Option<Rewriter>,
    pending: Pending,
}

impl<S> std::fmt::Debug for SendAuthority<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendAuthority").finish_non_exhaustive()
    }
}

impl<S> SendAuthority<S> {
    /// Wraps a client connection.
    #[must_use]
    pub fn new(inner: S, rule: AuthorityRule) -> Self {
        Self::maybe(inner, Some(rule))
    }

    pub(crate) fn maybe(inner: S, rule: Option<AuthorityRule>) -> Self {
        Self {
            inner,
            rewriter: rule.map(Rewriter::new),
            pending: Pending::default(),
        }
    }
}

impl<S: AsyncWrite + Unpin> SendAuthority<S> {
    /// Writes out what is pending; ready when nothing is.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.left().is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, self.pending.left()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.drain(cx))?;
        let Some(rewriter) = me.rewriter.as_mut() else {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        };
        rewriter.feed(buf, &mut me.pending.bytes)?;
        // Start writing at once; what does not fit waits for the next call.
        if let Poll::Ready(Err(e)) = me.drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.drain(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.drain(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame_header(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    fn request(authority: Option<&[u8]>) -> Fields {
        let mut h: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (
                b":path".to_vec(),
                b"/v1beta1.DevicePlugin/Allocate".to_vec(),
            ),
        ];
        if let Some(a) = authority {
            h.push((b":authority".to_vec(), a.to_vec()));
        }
        h.push((b"content-type".to_vec(), b"application/grpc".to_vec()));
        h
    }

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    /// Decodes what the rewriter produced, frame by frame, as h2 would:
    /// (type, flags, stream, fields) per frame or header block.
    fn read_back(bytes: &[u8]) -> Vec<(u8, u8, u32, Fields)> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut rest = &bytes[PREFACE_LEN..];
        let mut out = Vec::new();
        let mut block: Option<(u8, u32, Vec<u8>)> = None;
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = &rest[9..9 + len];
            rest = &rest[9 + len..];
            match kind {
                HEADERS => {
                    let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                    assert_eq!(flags & PADDED, 0, "padding is never re-emitted");
                    block = Some((flags, stream, payload[skip..].to_vec()));
                }
                CONTINUATION => block.as_mut().unwrap().2.extend_from_slice(payload),
                other => out.push((other, flags, stream, vec![(payload.to_vec(), vec![])])),
            }
            if matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
                let (f, s, b) = block.take().unwrap();
                out.push((HEADERS, f, s, decoder.decode(&b).unwrap()));
            }
        }
        out
    }

    fn run(rule: AuthorityRule, wire: &[u8], chunk: usize) -> Vec<u8> {
        let mut r = Rewriter::new(rule);
        let mut out = Vec::new();
        for piece in wire.chunks(chunk) {
            r.feed(piece, &mut out).unwrap();
        }
        out
    }

    fn client_wire(blocks: &[Fields]) -> Vec<u8> {
        // A client encoder that uses its dynamic table, as grpc stacks do.
        let mut enc = loona_hpack::Encoder::new();
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        for (i, h) in blocks.iter().enumerate() {
            let stream = 2 * u32::try_from(i).unwrap() + 1;
            let block = enc.encode(h.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            wire.extend(frame(HEADERS, END_HEADERS, stream, &block));
            wire.extend(frame(0x0, END_STREAM, stream, b"\0\0\0\0\0"));
        }
        wire
    }

    #[test]
    fn drops_only_authorities_h2_refuses() {
        let cases: &[(&[u8], bool)] = &[
            (b"localhost", true),
            (b"localhost:1234", true),
            (b"/var/lib/kubelet/device-plugins/kubelet.sock", false),
            (b"%2Fvar%2Flib%2Fkubelet%2Fdevice-plugins%2Fx.sock", false),
            (b"", false),
            (b"unix:/tmp/x.sock", false),
            (b"\xff\x00bytes", false),
        ];
        for &(authority, kept) in cases {
            // Three requests: the second and third reuse dynamic entries.
            let blocks = vec![request(Some(authority)); 3];
            let out = run(AuthorityRule::DropInvalid, &client_wire(&blocks), 7);
            let frames = read_back(&out);
            let headers: Vec<_> = frames.iter().filter(|f| f.0 == HEADERS).collect();
            assert_eq!(headers.len(), 3);
            for (_, flags, _, fields) in headers {
                assert_eq!(flags & END_HEADERS, END_HEADERS);
                let mut want = request(kept.then_some(authority));
                if !kept {
                    want.retain(|(n, _)| n != b":authority");
                }
                assert_eq!(fields, &want, "{:?}", String::from_utf8_lossy(authority));
            }
            // DATA passes unchanged.
            assert_eq!(frames.iter().filter(|f| f.0 == 0x0).count(), 3);
        }
    }

    #[test]
    fn sets_the_authority_a_client_rule_names() {
        let blocks = vec![request(Some(b"localhost")), request(None)];
        let path = b"/var/lib/kubelet/device-plugins/p.sock".to_vec();
        let out = run(
            AuthorityRule::Set(path.clone()),
            &client_wire(&blocks),
            4096,
        );
        let mut seen = 0;
        for (kind, _, _, fields) in read_back(&out) {
            if kind == HEADERS {
                seen += 1;
                let got: Vec<_> = fields.iter().filter(|(n, _)| n == b":authority").collect();
                assert_eq!(got, vec![&(b":authority".to_vec(), path.clone())]);
            }
        }
        assert_eq!(seen, blocks.len(), "every header block came out");
        let out = run(AuthorityRule::Remove, &client_wire(&blocks), 3);
        let mut seen = 0;
        for (kind, _, _, fields) in read_back(&out) {
            if kind == HEADERS {
                seen += 1;
                assert!(!fields.iter().any(|(n, _)| n == b":authority"));
            }
        }
        assert_eq!(seen, blocks.len(), "every header block came out");
    }

    #[test]
    fn follows_padding_priority_and_continuation() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(
            request(Some(b"/raw/path"))
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_slice())),
        );
        let (a, b) = block.split_at(block.len() / 2);
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0, 0, 0, 0, 16]); // priority
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload));
        wire.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        let out = run(AuthorityRule::DropInvalid, &wire, 1);
        let frames = read_back(&out);
        assert_eq!(frames.len(), 1);
        let (_, flags, stream, fields) = &frames[0];
        assert_eq!(*stream, 1);
        assert_eq!(*flags, PRIORITY | END_STREAM | END_HEADERS);
        assert!(!fields.iter().any(|(n, _)| n == b":authority"));
        // The priority bytes are kept right after the frame header.
        assert_eq!(&out[PREFACE_LEN + 9..PREFACE_LEN + 14], &[0, 0, 0, 0, 16]);
    }

    #[test]
    fn large_blocks_are_cut_into_frames_every_peer_accepts() {
        let mut h = request(Some(b"localhost"));
        h.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let out = run(AuthorityRule::DropInvalid, &client_wire(&[h.clone()]), 1000);
        let mut rest = &out[PREFACE_LEN..];
        let mut kinds = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            assert!(len <= MIN_MAX_FRAME);
            kinds.push(rest[3]);
            rest = &rest[9 + len..];
        }
        assert_eq!(&kinds[..4], &[0x4, HEADERS, CONTINUATION, CONTINUATION]);
        let frames = read_back(&out);
        assert_eq!(frames[1].3, h);
    }

    #[test]
    fn refuses_what_cannot_be_followed() {
        let bad: Vec<(&str, Vec<u8>)> = vec![
            (
                "padding past the end",
                frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 1, 2]),
            ),
            (
                "priority cut short",
                frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0]),
            ),
            (
                "index out of range",
                frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f]),
            ),
            (
                "stray continuation",
                frame(CONTINUATION, END_HEADERS, 1, &[0x82]),
            ),
            (
                "push promise",
                frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]),
            ),
            (
                "table size past the limit",
                frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0xff, 0x03, 0x82]),
            ),
            ("interleaved block", {
                let mut w = frame(HEADERS, 0, 1, &[0x82]);
                w.extend(frame(0x0, 0, 1, b"x"));
                w
            }),
            ("block too large", {
                let mut w = Vec::new();
                let chunk = vec![0u8; MIN_MAX_FRAME];
                w.extend(frame(HEADERS, 0, 1, &chunk));
                for _ in 0..=(MAX_HEADER_BLOCK / MIN_MAX_FRAME) {
                    w.extend(frame(CONTINUATION, 0, 1, &chunk));
                }
                w
            }),
        ];
        for (what, frames) in bad {
            let mut wire = PREFACE.to_vec();
            wire.extend(frames);
            let mut r = Rewriter::new(AuthorityRule::DropInvalid);
            let mut out = Vec::new();
            assert!(r.feed(&wire, &mut out).is_err(), "{what}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_end_in_output_or_an_error(wire in proptest::collection::vec(proptest::num::u8::ANY, 0..4096), chunk in 1usize..64) {
            let mut r = Rewriter::new(AuthorityRule::DropInvalid);
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                if r.feed(piece, &mut out).is_err() {
                    break;
                }
            }
        }
    }
}
