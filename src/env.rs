//! CONTRACT.md's environment: where the model, the cache and the data live (`STAR_LS_MODEL`,
//! `STAR_LS_CACHE_DIR`, `STAR_LS_DATA_DIR`), the thread cap, and the low-priority pool background work
//! runs in. Read by the server and the CLI alike.

use std::path::PathBuf;

/// The model path: `STAR_LS_MODEL`, or the fetched default in the cache.
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("STAR_LS_MODEL") {
        return PathBuf::from(p);
    }
    cache_dir().join("models").join(crate::DEFAULT_MODEL_FILE)
}

/// `STAR_LS_CACHE_DIR`, else `$XDG_CACHE_HOME/star-ls`, else `~/.cache/star-ls`.
pub fn cache_dir() -> PathBuf {
    xdg_dir("STAR_LS_CACHE_DIR", "XDG_CACHE_HOME", ".cache")
}

/// `STAR_LS_DATA_DIR`, else `$XDG_DATA_HOME/star-ls`, else `~/.local/share/star-ls`.
pub fn data_dir() -> PathBuf {
    xdg_dir("STAR_LS_DATA_DIR", "XDG_DATA_HOME", ".local/share")
}

fn xdg_dir(own: &str, xdg: &str, home_default: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(own) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os(xdg).map(PathBuf::from).unwrap_or_else(|| {
        // `HOME`, else the user's entry in the password database (a service started without `HOME`).
        let home = std::env::home_dir().unwrap_or_else(|| {
            tracing::warn!("no home directory: set {own}; using the working directory");
            PathBuf::from(".")
        });
        home.join(home_default)
    });
    base.join("star-ls")
}

/// Caps candle's worker threads; must run before the first model operation.
pub fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads.filter(|n| *n > 0) {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Runs `f` (and every candle operation in it) on a worker pool of its own whose threads run at the
/// lowest CPU priority: a repair uses the cores while no completion runs, and a completion that arrives
/// mid-step gets them at once instead of sharing them until the repair's next checkpoint.
pub fn in_background<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("star-ls-background-{i}"))
            .start_handler(|_| lowest_priority())
            .build()
            .map_err(|e| {
                tracing::warn!("no background pool ({e}): background work runs at normal priority")
            })
            .ok()
    });
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// Nice 19 for the calling thread (Linux schedules threads individually).
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on our own thread id; it reads no memory of ours.
    unsafe {
        let tid = libc::gettid();
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) != 0 {
            tracing::warn!("could not lower a background thread's priority");
        }
    }
}
