//! The real `star-ls` binary over stdio with the packaged model.

mod client;

use client::{packaged_model, Client};
use serde_json::{json, Value};
use std::time::Duration;

const ADD: &str = "def add(a, b):\n    return \n";

fn ready(c: &mut Client) {
    c.wait_for("model-load progress end", |m| {
        m["method"] == "$/progress" && m["params"]["value"]["kind"] == "end"
    });
}

#[test]
fn completes_add_with_ids_and_reports_load_progress() {
    let mut c = Client::start(&packaged_model(), json!({ "threads": 2 }), &[]);
    let begin = c.wait_for("progress begin", |m| {
        m["method"] == "$/progress" && m["params"]["value"]["kind"] == "begin"
    });
    assert_eq!(begin["params"]["value"]["title"], "star-ls");
    ready(&mut c);

    let uri = "file:///work/add.py";
    c.open(uri, ADD);
    let list = c.call(
        "textDocument/completion",
        Client::completion_params(uri, 1, 11),
    );
    let item = &list["items"][0];
    assert_eq!(item["textEdit"]["newText"], "a + b", "{list}");
    let first_id = item["data"]["completionId"].as_str().unwrap().to_owned();
    assert!(!first_id.is_empty());

    let inline = c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, 1, 11),
    );
    let item = &inline["items"][0];
    assert_eq!(item["insertText"], "a + b", "{inline}");
    assert_eq!(item["command"]["command"], "star.accepted");
    let second_id = item["command"]["arguments"][0].as_str().unwrap();
    assert_ne!(second_id, first_id, "every completion gets its own id");

    // UTF-16: an emoji before the cursor counts two columns.
    let uri2 = "file:///work/emoji.py";
    c.open(uri2, "def greet():\n    s = \"😀\"\n    return \n");
    let list = c.call(
        "textDocument/completion",
        Client::completion_params(uri2, 2, 11),
    );
    assert!(
        list["items"][0]["textEdit"]["newText"].as_str().is_some(),
        "{list}"
    );
    c.shutdown();
}

#[test]
fn one_character_edit_reuses_the_prefix_cache() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/python/inventory.py"
    ))
    .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let line = lines.len() as u32; // the empty line after the file's last line
    let mut c = Client::start(
        &packaged_model(),
        json!({ "threads": 2, "debounceMs": 0 }),
        &[],
    );
    ready(&mut c);
    let uri = "file:///work/inventory.py";
    let body = format!("{text}    total = ");
    c.open(uri, &body);
    let col = "    total = ".len() as u32;
    c.call(
        "textDocument/completion",
        Client::completion_params(uri, line, col),
    );
    let cold = c.status()["completions"]["last"].clone();
    assert!(cold["promptTokens"].as_u64().unwrap() > 150, "{cold}");
    assert_eq!(
        cold["prefilled"], cold["promptTokens"],
        "a cold cache prefills everything"
    );

    c.insert(uri, 2, line, col, "s");
    c.call(
        "textDocument/completion",
        Client::completion_params(uri, line, col + 1),
    );
    let warm = c.status()["completions"]["last"].clone();
    let prefilled = warm["prefilled"].as_u64().unwrap();
    assert!(
        prefilled <= 6,
        "one typed character re-ran {prefilled} prompt tokens: {warm}"
    );
    c.shutdown();
}

#[test]
fn cancellation_stops_a_decode_and_newer_requests_supersede_older() {
    let opts = json!({ "threads": 2, "maxTokens": 400, "multiline": "block", "debounceMs": 0 });
    let mut c = Client::start(&packaged_model(), opts, &[]);
    ready(&mut c);
    let uri = "file:///work/primes.py";
    c.open(uri, "PRIMES = [\n    2,\n    3,\n    5,\n    7,\n    \n]\n");
    let id = c.request_async(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, 5, 4),
    );
    // Cancelled once the decode is under way.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s = c.status()["completions"].clone();
        if s["decoding"].as_u64().is_some_and(|n| n > 0) {
            break;
        }
        assert!(
            s["completed"] == 0 && s["cancelled"] == 0,
            "the completion ended before its decode was seen: {s}"
        );
        assert!(std::time::Instant::now() < deadline, "no decode started");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.notify("$/cancelRequest", json!({ "id": id }));
    let r = c.response(id);
    assert_eq!(
        r["error"]["code"], -32800,
        "a cancelled request answers RequestCancelled: {r}"
    );
    let stats = loop {
        let s = c.status()["completions"].clone();
        if s["cancelled"].as_u64() == Some(1) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let generated = stats["last"]["generated"].as_u64().unwrap();
    assert_eq!(stats["last"]["stop"], "cancelled", "{stats}");
    assert!(generated < 400, "the decode ran to its budget: {stats}");

    // Two requests for one document: the first is superseded and answers with no items.
    let params = Client::inline_params(uri, 5, 4);
    let opts_first = c.request_async("textDocument/inlineCompletion", params.clone());
    let second = c.request_async("textDocument/inlineCompletion", params);
    let first = c.response(opts_first);
    let second = c.response(second);
    assert_eq!(first["result"]["items"], json!([]), "{first}");
    assert!(
        second["result"]["items"][0]["insertText"]
            .as_str()
            .unwrap()
            .contains(','),
        "{second}"
    );

    // A completion list and an inline completion at the same keystroke do not supersede each other.
    let list = c.request_async(
        "textDocument/completion",
        Client::completion_params(uri, 5, 4),
    );
    let inline = c.request_async(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, 5, 4),
    );
    let (list, inline) = (c.response(list), c.response(inline));
    assert!(list["result"]["items"][0]["textEdit"].is_object(), "{list}");
    assert!(
        inline["result"]["items"][0]["insertText"].is_string(),
        "{inline}"
    );
    c.shutdown();
}

#[test]
fn bad_input_gets_an_error_and_the_server_keeps_serving() {
    let mut c = Client::start(&packaged_model(), json!({ "threads": 2 }), &[]);
    ready(&mut c);
    let uri = "file:///work/add.py";
    c.open(uri, ADD);
    let code = |r: &Value| r["error"]["code"].as_i64();

    let r = c.request(
        "textDocument/completion",
        Client::completion_params("file:///nowhere.py", 0, 0),
    );
    assert_eq!(code(&r), Some(-32602), "unknown document: {r}");
    let r = c.request(
        "textDocument/completion",
        Client::completion_params(uri, 99, 0),
    );
    assert_eq!(code(&r), Some(-32602), "line out of range: {r}");
    let r = c.request(
        "textDocument/completion",
        json!({ "textDocument": { "uri": uri }, "position": "x" }),
    );
    assert_eq!(code(&r), Some(-32602), "malformed params: {r}");
    let r = c.request("star/noSuchMethod", json!({}));
    assert_eq!(code(&r), Some(-32601), "unknown method: {r}");
    let r = c.request(
        "workspace/executeCommand",
        json!({ "command": "star.nothing" }),
    );
    assert_eq!(code(&r), Some(-32602), "unknown command: {r}");

    // Broken JSON, an edit to an unknown document, an edit out of range: none stops the server.
    c.send_raw(b"Content-Length: 9\r\n\r\n{\"jsonrpc");
    c.insert("file:///nowhere.py", 2, 0, 0, "x");
    c.insert(uri, 1, 0, 0, "# stale version\n");
    // A column past the line's end means the line's end (LSP's rule).
    let list = c.call(
        "textDocument/completion",
        Client::completion_params(uri, 2, 400),
    );
    assert!(list.is_null() || list["items"].is_array(), "{list}");
    let list = c.call(
        "textDocument/completion",
        Client::completion_params(uri, 2, 11),
    );
    assert_eq!(list["items"][0]["textEdit"]["newText"], "a + b", "{list}");
    c.shutdown();
}

#[test]
fn a_missing_model_is_reported_with_the_fetch_command() {
    let mut c = Client::start(
        std::path::Path::new("/nonexistent/model.gguf"),
        json!({}),
        &[],
    );
    let msg = c.wait_for("an error message", |m| m["method"] == "window/showMessage");
    let text = msg["params"]["message"].as_str().unwrap();
    assert!(text.contains("scripts/fetch-model"), "{text}");
    c.open("file:///a.py", ADD);
    let r = c.request(
        "textDocument/completion",
        Client::completion_params("file:///a.py", 1, 11),
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model unavailable"),
        "{r}"
    );
    c.shutdown();
}

/// With `crossFileTokens`, a completion sees a file opened before: here the one name it can import
/// from it. Typing something else then re-runs only the tokens typed: the other files' chunks stay
/// as they were.
#[test]
fn another_open_file_reaches_the_completion_and_typing_keeps_the_cache_warm() {
    let pricing =
        "def apply_seasonal_discount(order, rate):\n    return round(order.total * (1 - rate), 2)\n";
    let cart = "from .pricing import \n\ndef checkout(order, rate):\n    pass\n";
    let col = "from .pricing import ".len() as u32;
    let line_at = |tokens: u64| {
        let mut c = Client::start_in(
            &packaged_model(),
            json!({ "threads": 2, "debounceMs": 0, "crossFileTokens": tokens }),
            &[],
            json!("file:///work/shop"),
        );
        ready(&mut c);
        c.open("file:///work/shop/pricing.py", pricing);
        let uri = "file:///work/shop/cart.py";
        c.open(uri, cart);
        let r = c.call(
            "textDocument/inlineCompletion",
            Client::inline_params(uri, 0, col),
        );
        let text = r["items"][0]["insertText"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        (c, text)
    };
    let (mut bare, without) = line_at(0);
    let bare_tokens = bare.status()["completions"]["last"]["promptTokens"]
        .as_u64()
        .unwrap();
    bare.shutdown();
    assert!(!without.contains("apply_seasonal_discount"), "{without}");

    let (mut c, with) = line_at(512);
    assert!(with.contains("apply_seasonal_discount"), "{with}");
    let uri = "file:///work/shop/cart.py";
    // Not the proposal's start: that would be answered with its rest, without the model.
    let typed = if with.starts_with('z') { "y" } else { "z" };
    c.insert(uri, 2, 0, col, typed);
    c.call(
        "textDocument/inlineCompletion",
        Client::inline_params(uri, 0, col + 1),
    );
    let warm = c.status()["completions"]["last"].clone();
    let prefilled = warm["prefilled"].as_u64().unwrap();
    // Still with pricing.py's chunk before it (some 25 tokens), which was not run again: at most the
    // file's own part of the prompt was (the typed token, then the suffix after it).
    assert!(
        warm["promptTokens"].as_u64().unwrap() > bare_tokens + 20,
        "{warm}"
    );
    assert!(
        prefilled < bare_tokens,
        "one typed character re-ran {prefilled} prompt tokens: {warm}, {bare_tokens} without other files"
    );
    c.shutdown();
}
