//! A guard in front of the JSON-RPC transport. tower-lsp-server's reader stops for good at the first
//! body that is not JSON (its framed stream ends after an error), which would end the session; here each
//! frame is checked first, and a malformed one is logged and dropped so the session goes on.

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};

/// Larger bodies are refused: a wrong length must not make us allocate gigabytes.
const MAX_BODY: usize = 64 << 20;

/// Returns a reader that yields only well-formed frames read from `input`.
pub fn checked_frames(input: impl AsyncRead + Unpin + Send + 'static) -> DuplexStream {
    let (reader, mut writer) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let mut input = BufReader::new(input);
        while let Some(body) = next_frame(&mut input).await {
            if let Err(e) = serde_json::from_slice::<serde_json::Value>(&body) {
                tracing::error!("dropping a message that is not JSON ({e})");
                continue;
            }
            let header = format!("Content-Length: {}\r\n\r\n", body.len());
            if writer.write_all(header.as_bytes()).await.is_err()
                || writer.write_all(&body).await.is_err()
            {
                break; // the transport has stopped
            }
        }
    });
    reader
}

/// The next frame's body; garbage before a `Content-Length` header is skipped. None at end of input.
async fn next_frame(input: &mut (impl AsyncBufReadExt + Unpin)) -> Option<Vec<u8>> {
    loop {
        let mut length = None;
        loop {
            let mut line = Vec::new();
            if input.read_until(b'\n', &mut line).await.ok()? == 0 {
                return None;
            }
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end();
            if line.is_empty() {
                if length.is_some() {
                    break;
                }
                continue;
            }
            match line.split_once(':') {
                Some((name, value)) if name.eq_ignore_ascii_case("content-length") => {
                    length = value.trim().parse::<usize>().ok();
                    if length.is_none() {
                        tracing::error!("bad Content-Length header {line:?}");
                    }
                }
                Some((name, _)) if name.eq_ignore_ascii_case("content-type") => {}
                _ => tracing::error!("skipping garbage before a message header: {line:?}"),
            }
        }
        let length = length?;
        if length > MAX_BODY {
            tracing::error!("refusing a {length}-byte message (limit {MAX_BODY})");
            continue;
        }
        let mut body = vec![0; length];
        input.read_exact(&mut body).await.ok()?;
        return Some(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn malformed_frames_are_dropped_and_good_ones_pass() {
        let input: &[u8] = b"garbage\r\nContent-Length: 9\r\n\r\n{\"jsonrpcContent-Length: x\r\n\r\nContent-Length: 2\r\n\r\n{}";
        let mut out = checked_frames(input);
        let mut s = String::new();
        out.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "Content-Length: 2\r\n\r\n{}");
    }
}
