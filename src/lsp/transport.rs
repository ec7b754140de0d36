//! A guard in front of the JSON-RPC transport. tower-lsp-server's reader stops for good at the first
//! body that is not a JSON-RPC message (its framed stream ends after an error), which would end the
//! session; here each frame is checked first, and a malformed one is logged and dropped so the session
//! goes on. After a wrong Content-Length, the next header is found even where it follows a body's rest.

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};

/// Larger bodies are refused: a wrong length must not make us allocate gigabytes.
const MAX_BODY: usize = 64 << 20;

/// Returns a reader that yields only well-formed frames read from `input`.
pub fn checked_frames(input: impl AsyncRead + Unpin + Send + 'static) -> DuplexStream {
    let (reader, mut writer) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let mut input = BufReader::new(input);
        while let Some(body) = next_frame(&mut input).await {
            if let Err(e) = check_message(&body) {
                tracing::error!("dropping a message that is not JSON-RPC ({e})");
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

/// Whether `body` is a message the transport accepts: JSON that is a JSON-RPC request, notification or
/// response. Its reader stops as well at JSON of another shape (`{}`, `[]`, `42`, an id of 1.5, ...).
fn check_message(body: &[u8]) -> Result<(), serde_json::Error> {
    use tower_lsp_server::jsonrpc::{Request, Response};
    let value = serde_json::from_slice::<serde_json::Value>(body)?;
    // The transport tries `Response` first, then `Request` (an untagged enum); a response has one of these.
    let response = value.get("result").is_some() || value.get("error").is_some();
    if response && serde_json::from_value::<Response>(value.clone()).is_ok() {
        return Ok(());
    }
    serde_json::from_value::<Request>(value).map(drop)
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
            let mut line = line.trim_end();
            // After a wrong length or a frame without one, the next header follows the rest of a body
            // on the same line (bodies need not end with a newline): resynchronise on it.
            if let Some(at) = line.to_ascii_lowercase().rfind("content-length:") {
                if at > 0 {
                    tracing::error!("skipping {at} bytes of garbage before a message header");
                    line = &line[at..];
                }
            }
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
        let good = r#"{"jsonrpc":"2.0","method":"m"}"#;
        let input = format!(
            "garbage\r\nContent-Length: 9\r\n\r\n{{\"jsonrpcContent-Length: x\r\n\r\nContent-Length: 2\r\n\r\n{{}}Content-Length: {}\r\n\r\n{good}",
            good.len()
        );
        let mut out = checked_frames(std::io::Cursor::new(input.into_bytes()));
        let mut s = String::new();
        out.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, format!("Content-Length: {}\r\n\r\n{good}", good.len()));
    }

    #[tokio::test]
    async fn the_stream_resynchronises_after_a_wrong_length() {
        let good = r#"{"jsonrpc":"2.0","id":1,"method":"m"}"#;
        let frame = |len: usize| format!("Content-Length: {len}\r\n\r\n{good}");
        // Too short (the rest of the body runs into the next header), no length, a negative one.
        let input = format!(
            "{}{}Content-Type: x\r\n\r\n{good}{}Content-Length: -1\r\n\r\n{good}{}",
            frame(good.len() - 3),
            frame(good.len()),
            frame(good.len()),
            frame(good.len())
        );
        let mut out = checked_frames(std::io::Cursor::new(input.into_bytes()));
        let mut s = String::new();
        out.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, frame(good.len()).repeat(3));
    }
}
