//! `ferry-uffd-handler`: Firecracker's external page-fault handler, served by ferry's engine.
//!
//! ```text
//! ferry-uffd-handler --socket PATH --mem-file PATH [--prepager bubbling|push|demand]
//!                    [--record] [--replay] [--accept-timeout-s 60] [--supervise] [--json]
//! ```
//! Listens on PATH (what Firecracker's `/snapshot/load` gets as `mem_backend.backend_path`),
//! serves one restore from Firecracker's memory file, and prints what it measured.
//!
//! With `--supervise` it only keeps Firecracker's socket and userfaultfd, and hands them to a
//! worker (this program, on a private socket, by the same handshake); if the worker dies, a new
//! one gets them and wakes every thread still waiting on a fault, so each faults again into it.
//! Firecracker, which would otherwise hang on its next fault, never notices. Pages the dead
//! worker installed are kept (a new install of them meets EEXIST); the removes it had read are
//! replayed from the journal every worker appends to (`PATH.removed`, `--remove-journal`). One
//! window is left: a worker killed between reading a remove and journaling it.

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
    let mut remove_journal = None;
    let mut config = EngineConfig::default();
    let (mut record, mut replay, mut supervise) = (false, false, false);
    let mut passthrough = Vec::new();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => socket = Some(std::path::PathBuf::from(value()?)),
            "--mem-file" => mem_file = Some(std::path::PathBuf::from(value()?)),
            "--prepager" => {
                let v = value()?;
                config.policy = v.parse().map_err(|e: String| anyhow!(e))?;
                passthrough.extend(["--prepager".to_string(), v]);
            }
            "--record" => {
                record = true;
                passthrough.push(flag);
            }
            "--replay" => {
                replay = true;
                passthrough.push(flag);
            }
            "--supervise" => supervise = true,
            "--remove-journal" => remove_journal = Some(std::path::PathBuf::from(value()?)),
            "--accept-timeout-s" => accept_timeout = value()?.parse()?,
            "--json" => json = true,
            other => bail!("unknown option {other}; usage: ferry-uffd-handler --socket PATH --mem-file PATH [--prepager P] [--record] [--replay] [--supervise] [--json]"),
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
    if supervise {
        let result = supervisor::run(&stream, &socket, &mem_file, &passthrough, json);
        let _ = std::fs::remove_file(&socket);
        return result;
    }
    let served = serve(
        &stream,
        &ServeConfig {
            mem_file,
            engine: config,
            record,
            replay,
            handshake_timeout: Duration::from_secs(10),
            remove_journal,
        },
    )?;
    let mut out = json!({
        "regions": served.regions,
        "page_size": served.page_size,
        "ready_ms": served.ready.as_secs_f64() * 1e3,
        "faults": served.faults,
        "network_faults": served.network_faults,
        "complete": served.report.is_some(),
        "working_set_pages": served.working_set_pages,
        "removes_replayed": served.removes_replayed,
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

mod supervisor {
    //! Keeps Firecracker's socket and userfaultfd, and runs workers that serve them.

    use std::io::{BufRead, BufReader, Read};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use anyhow::{anyhow, bail, Context, Result};
    use ferry_uffd_handler::protocol::{receive_handshake, send_handshake};

    /// Workers started at most, the first included.
    const MAX_WORKERS: usize = 8;

    pub fn run(firecracker: &UnixStream, socket: &Path, mem_file: &Path, options: &[String], json: bool) -> Result<()> {
        let (mappings, uffd) = receive_handshake(firecracker, Duration::from_secs(10))?;
        let worker_socket = socket.with_extension("worker");
        let journal = socket.with_extension("removed");
        std::fs::write(&journal, b"")?;
        let result = supervise(firecracker, &mappings, &uffd, &worker_socket, &journal, mem_file, options, json);
        let _ = std::fs::remove_file(&journal);
        let _ = std::fs::remove_file(&worker_socket);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn supervise(
        firecracker: &UnixStream,
        mappings: &[ferry_uffd_handler::GuestRegionUffdMapping],
        uffd: &std::os::fd::OwnedFd,
        worker_socket: &Path,
        journal: &Path,
        mem_file: &Path,
        options: &[String],
        json: bool,
    ) -> Result<()> {
        for attempt in 1..=MAX_WORKERS {
            let _ = std::fs::remove_file(worker_socket);
            let mut child = Command::new(std::env::current_exe()?)
                .arg("--socket")
                .arg(worker_socket)
                .arg("--mem-file")
                .arg(mem_file)
                .arg("--remove-journal")
                .arg(journal)
                .args(options)
                .args(json.then_some("--json"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting a worker")?;
            let mut stderr = BufReader::new(child.stderr.take().ok_or_else(|| anyhow!("no worker stderr"))?);
            let mut line = String::new();
            stderr.read_line(&mut line)?;
            if !line.contains("listening on") {
                let _ = child.kill();
                bail!("the worker did not start: {line}");
            }
            eprintln!("ferry-uffd-handler: worker {} serving (attempt {attempt})", child.id());
            let worker = UnixStream::connect(worker_socket)?;
            send_handshake(&worker, mappings, uffd.as_raw_fd())?;
            // Firecracker hanging up ends the worker too: its socket closes.
            let watch = {
                let (firecracker, worker) = (firecracker.try_clone()?, worker.try_clone()?);
                std::thread::spawn(move || {
                    // Firecracker sends nothing after its handshake: any readiness is its end.
                    let mut pfd = libc::pollfd { fd: firecracker.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
                    // SAFETY: one valid pollfd that lives across the call; -1 waits for an event.
                    while unsafe { libc::poll(&mut pfd, 1, -1) } <= 0 {}
                    let _ = worker.shutdown(std::net::Shutdown::Both);
                })
            };
            let mut report = String::new();
            child.stdout.take().ok_or_else(|| anyhow!("no worker stdout"))?.read_to_string(&mut report)?;
            let status = child.wait()?;
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            drop(watch);
            if status.success() {
                print!("{report}");
                return Ok(());
            }
            eprintln!("ferry-uffd-handler: worker {} ended ({status}): {}; starting another", child.id(), rest.trim());
            drop(worker);
        }
        bail!("{MAX_WORKERS} workers died; giving up (Firecracker's faults now wait for a handler)")
    }
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
