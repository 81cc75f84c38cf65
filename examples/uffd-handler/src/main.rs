//! `ferry-uffd-handler`: Firecracker's external page-fault handler, served by ferry's engine.
//!
//! ```text
//! ferry-uffd-handler --socket PATH --mem-file PATH [--prepager bubbling|push|demand]
//!                    [--record] [--replay] [--accept-timeout-s 60] [--json]
//! ```
//! Listens on PATH (what Firecracker's `/snapshot/load` gets as `mem_backend.backend_path`),
//! serves one restore from Firecracker's memory file, and prints what it measured.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry::engine::EngineConfig;
use ferry_uffd_handler::{serve, socket_in_use, ServeConfig};
use serde_json::json;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut socket, mut mem_file, mut json, mut accept_timeout) = (None, None, false, 60.0);
    let mut config = EngineConfig::default();
    let (mut record, mut replay) = (false, false);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => socket = Some(std::path::PathBuf::from(value()?)),
            "--mem-file" => mem_file = Some(std::path::PathBuf::from(value()?)),
            "--prepager" => config.policy = value()?.parse().map_err(|e: String| anyhow!(e))?,
            "--record" => record = true,
            "--replay" => replay = true,
            "--accept-timeout-s" => accept_timeout = value()?.parse()?,
            "--json" => json = true,
            other => bail!("unknown option {other}; usage: ferry-uffd-handler --socket PATH --mem-file PATH [--prepager P] [--record] [--replay] [--json]"),
        }
    }
    let socket = socket.ok_or_else(|| anyhow!("--socket PATH is required"))?;
    let mem_file = mem_file.ok_or_else(|| anyhow!("--mem-file PATH is required"))?;
    if socket_in_use(&socket) {
        bail!("{} is in use by another handler", socket.display());
    }
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    eprintln!("ferry-uffd-handler: listening on {}", socket.display());
    let stream = accept_within(&listener, Duration::from_secs_f64(accept_timeout))?;
    let served = serve(
        &stream,
        &ServeConfig { mem_file, engine: config, record, replay, handshake_timeout: Duration::from_secs(10) },
    )?;
    let mut out = json!({
        "regions": served.regions,
        "page_size": served.page_size,
        "ready_ms": served.ready.as_secs_f64() * 1e3,
        "faults": served.faults,
        "network_faults": served.network_faults,
        "complete": served.report.is_some(),
        "working_set_pages": served.working_set_pages,
    });
    if let Some(r) = &served.report {
        out["policy"] = json!(r.policy);
        out["pages_total"] = json!(r.pages_total);
        out["total_ms"] = json!(r.total.as_secs_f64() * 1e3);
        out["bulk_pages"] = json!(r.bulk_pages);
        out["zero_pages"] = json!(r.zero_pages + r.skipped_free_pages);
        out["discarded_pages"] = json!(r.discarded_pages);
        out["replayed_pages"] = json!(r.replayed_pages);
        out["pages_installed_twice"] = json!(r.pages_installed_twice);
        out["fault_p50_us"] = json!(r.fault_p50.as_secs_f64() * 1e6);
        out["recorded_working_set_pages"] = json!(r.first_faults.len());
    }
    if json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Waits up to `timeout` for Firecracker to connect.
fn accept_within(listener: &UnixListener, timeout: Duration) -> Result<std::os::unix::net::UnixStream> {
    let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd that lives across the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    if rc <= 0 {
        bail!("nobody connected within {timeout:?}");
    }
    Ok(listener.accept()?.0)
}
