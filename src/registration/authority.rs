//! Kubelet's plugin watcher dials the registration socket with grpc-go's
//! default target handling, which puts the socket *path* in the HTTP/2
//! `:authority` pseudo-header (`/var/lib/kubelet/plugins_registry/…`).
//! The `h2` crate under tonic rejects such an authority as malformed and
//! resets the stream (PROTOCOL_ERROR), so kubelet could never register us.
//! (Kubernetes fixed the same thing for its CSI client by sending
//! `localhost`; the plugin watcher still sends the path.)
//!
//! This module sits between the socket and the gRPC server: it copies the
//! HTTP/2 byte stream, decodes each request header block (HPACK), replaces
//! an `:authority` that is a path by `localhost`, and re-encodes the block
//! with literal representations only. Everything else, and the whole
//! server-to-client direction, passes through unchanged.

use std::io;

use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The largest frame payload we emit: HTTP/2's initial SETTINGS_MAX_FRAME_SIZE.
const MAX_EMIT: usize = 16_384;
/// A header block larger than this is refused (kubelet's are ~200 bytes).
const MAX_BLOCK: usize = 1 << 20;

fn protocol(msg: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from kubelet: {msg}"),
    )
}

/// HPACK integer with an `n`-bit prefix, first byte OR-ed with `mask`.
fn encode_int(out: &mut Vec<u8>, mask: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(mask | v as u8);
        return;
    }
    out.push(mask | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// Encodes headers as "literal header field without indexing — new name",
/// plain (not Huffman) strings: the server's dynamic table stays empty, so
/// no state has to be kept in step with it.
pub(crate) fn encode_literal(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        encode_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name);
        encode_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

/// Replaces an `:authority` that is not a valid authority (grpc-go sends
/// the socket path, percent-encoded: `%2Fvar%2Flib%2F…`).
fn fix(headers: &mut [(Vec<u8>, Vec<u8>)]) -> bool {
    let mut changed = false;
    for (name, value) in headers.iter_mut() {
        if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
            *value = b"localhost".to_vec();
            changed = true;
        }
    }
    changed
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

/// Copies client → server, rewriting request header blocks.
pub async fn rewrite<R, W>(mut from: R, mut to: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(protocol("missing connection preface"));
    }
    to.write_all(&preface).await?;
    let mut decoder = Decoder::new();
    let mut head = [0u8; 9];
    loop {
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return to.shutdown().await,
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        if kind != FRAME_HEADERS {
            to.write_all(&head).await?;
            to.write_all(&payload).await?;
            to.flush().await?;
            continue;
        }
        // HEADERS: strip padding and priority, then gather CONTINUATIONs.
        let mut body: &[u8] = &payload;
        let mut pad = 0usize;
        if flags & FLAG_PADDED != 0 {
            pad = *body
                .first()
                .ok_or_else(|| protocol("empty padded HEADERS"))? as usize;
            body = &body[1..];
        }
        if flags & FLAG_PRIORITY != 0 {
            body = body
                .get(5..)
                .ok_or_else(|| protocol("short priority HEADERS"))?;
        }
        let end = body
            .len()
            .checked_sub(pad)
            .ok_or_else(|| protocol("padding longer than HEADERS"))?;
        let mut block = body[..end].to_vec();
        let mut end_headers = flags & FLAG_END_HEADERS != 0;
        while !end_headers {
            from.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            if head[3] != FRAME_CONTINUATION || block.len() + len > MAX_BLOCK {
                return Err(protocol("bad CONTINUATION"));
            }
            end_headers = head[4] & FLAG_END_HEADERS != 0;
            let at = block.len();
            block.resize(at + len, 0);
            from.read_exact(&mut block[at..]).await?;
        }
        let mut headers = decoder
            .decode(&block)
            .map_err(|e| protocol(&format!("undecodable header block: {e:?}")))?;
        if fix(&mut headers) {
            tracing::trace!(stream, "rewrote :authority of a kubelet request");
        }
        let block = encode_literal(&headers);
        let mut chunks = block.chunks(MAX_EMIT).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let (kind, mut f) = if first {
                (FRAME_HEADERS, flags & FLAG_END_STREAM)
            } else {
                (FRAME_CONTINUATION, 0)
            };
            if last {
                f |= FLAG_END_HEADERS;
            }
            to.write_all(&frame_header(chunk.len(), kind, f, stream))
                .await?;
            to.write_all(chunk).await?;
            first = false;
        }
        if block.is_empty() {
            to.write_all(&frame_header(
                0,
                FRAME_HEADERS,
                (flags & FLAG_END_STREAM) | FLAG_END_HEADERS,
                stream,
            ))
            .await?;
        }
        to.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authority: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/pluginregistration.Registration/GetInfo"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("user-agent", &"x".repeat(300)),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    async fn run(input: Vec<u8>) -> Vec<u8> {
        let (mut client, proxy_in) = tokio::io::duplex(1 << 16);
        let (proxy_out, mut server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(rewrite(proxy_in, proxy_out));
        client.write_all(&input).await.unwrap();
        drop(client);
        task.await.unwrap().unwrap();
        let mut out = Vec::new();
        server.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn path_authority_becomes_localhost_and_other_frames_pass() {
        let block = encode_literal(&headers(
            "/var/lib/kubelet/plugins_registry/stead.csi.dev-reg.sock",
        ));
        // A PADDED HEADERS frame split over a CONTINUATION, then a DATA frame.
        let split = 40;
        let mut first = vec![3u8];
        first.extend_from_slice(&block[..split]);
        first.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame_header(first.len(), FRAME_HEADERS, FLAG_PADDED, 1));
        input.extend_from_slice(&first);
        input.extend_from_slice(&frame_header(
            block.len() - split,
            FRAME_CONTINUATION,
            FLAG_END_HEADERS,
            1,
        ));
        input.extend_from_slice(&block[split..]);
        input.extend_from_slice(&frame_header(5, 0x0, FLAG_END_STREAM, 1));
        input.extend_from_slice(&[0, 0, 0, 0, 0]);

        let out = run(input).await;
        assert_eq!(&out[..24], PREFACE);
        let len = u32::from_be_bytes([0, out[24], out[25], out[26]]) as usize;
        assert_eq!(out[27], FRAME_HEADERS);
        assert_eq!(out[28], FLAG_END_HEADERS);
        let decoded = Decoder::new().decode(&out[33..33 + len]).unwrap();
        assert_eq!(decoded, headers("localhost"));
        let data = &out[33 + len..];
        assert_eq!(
            data,
            [&frame_header(5, 0x0, FLAG_END_STREAM, 1)[..], &[0; 5]].concat()
        );
    }

    #[tokio::test]
    async fn host_authority_is_kept_and_bad_preface_refused() {
        let block = encode_literal(&headers("localhost"));
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame_header(
            block.len(),
            FRAME_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
        ));
        input.extend_from_slice(&block);
        let out = run(input).await;
        assert_eq!(out[28], FLAG_END_HEADERS | FLAG_END_STREAM);
        assert_eq!(
            Decoder::new().decode(&out[33..]).unwrap(),
            headers("localhost")
        );

        let (mut c, p_in) = tokio::io::duplex(64);
        let (p_out, _s) = tokio::io::duplex(64);
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(rewrite(p_in, p_out).await.is_err());
    }

    #[test]
    fn integers_use_continuation_bytes_past_the_prefix() {
        let mut out = Vec::new();
        encode_int(&mut out, 0, 7, 300);
        assert_eq!(out, [127, 173, 1]);
    }
}
