//! The C ABI as a C program sees it: `scripts/install-c.sh` installs the library, header and
//! pkg-config file into a scratch prefix; the system C compiler builds `examples/c-embed` against
//! them (shared through pkg-config, and static); the programs migrate memory between two of their
//! processes, snapshot and restore it, and walk the error paths.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

/// Installs once per test run: the libferry_ffi.{so,a} that `cargo test` built beside this test's
/// own binary (in target/<profile>/deps), so nothing is compiled again.
fn prefix() -> &'static Path {
    static PREFIX: OnceLock<PathBuf> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-prefix");
        let exe = std::env::current_exe().expect("test binary path");
        let deps = exe.parent().expect("the test binary's directory");
        assert!(
            deps.join("libferry_ffi.so").exists(),
            "cargo test did not build libferry_ffi.so in {}",
            deps.display()
        );
        let status = Command::new("bash")
            .arg(root().join("scripts/install-c.sh"))
            .arg(&prefix)
            .env("FERRY_LIB_DIR", deps)
            .status()
            .expect("run scripts/install-c.sh");
        assert!(status.success(), "install-c.sh failed");
        prefix
    })
}

fn pkg_config(flags: &str) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(flags.split_whitespace())
        .arg("ferry")
        .env("PKG_CONFIG_PATH", prefix().join("lib/pkgconfig"))
        .output()
        .expect("run pkg-config");
    assert!(out.status.success(), "pkg-config {flags} ferry: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().split_whitespace().map(str::to_owned).collect()
}

/// Compiles one example; `static_link` links libferry.a instead of the shared library.
fn compile(name: &str, static_link: bool) -> PathBuf {
    let source = root().join(format!("examples/c-embed/{name}.c"));
    let out = prefix().join(format!("{name}{}", if static_link { "-static" } else { "" }));
    let mut cc = Command::new("cc");
    cc.args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"])
        .args(pkg_config("--cflags"))
        .arg(&source)
        .arg("-o")
        .arg(&out);
    if static_link {
        // The archive, then what it needs (Libs.private: libibverbs too when built with rdma).
        let private = pkg_config("--static --libs").into_iter().filter(|a| a != "-lferry" && !a.starts_with("-L"));
        cc.arg(prefix().join("lib/libferry.a")).args(private);
    } else {
        cc.args(pkg_config("--libs")).arg(format!("-Wl,-rpath,{}", prefix().join("lib").display())).arg("-lpthread");
    }
    let result = cc.output().expect("run cc");
    assert!(result.status.success(), "cc {name}.c failed:\n{}", String::from_utf8_lossy(&result.stderr));
    out
}

fn run(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("run the C program");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{stdout}\n{}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn c_program_migrates_its_memory_post_copy() {
    let program = compile("migrate", false);
    for (backing, transport) in [("anon", "tcp"), ("memfd", "tcp"), ("anon", "unix"), ("memfd", "unix")] {
        let out = run(&program, &[backing, transport]);
        assert!(out.contains("c-embed: PASS"), "{out}");
        assert!(out.contains("0 words wrong"), "{out}");
    }
}

#[test]
fn c_program_links_the_static_library() {
    let out = run(&compile("migrate", true), &["anon"]);
    assert!(out.contains("c-embed: PASS"), "{out}");
}

#[test]
fn c_program_migrates_pre_copy_with_its_own_dirty_log() {
    let out = run(&compile("precopy", false), &[]);
    assert!(out.contains("c-precopy: PASS"), "{out}");
}

#[test]
fn c_program_goes_back_and_forth_onto_kept_images_pre_and_post_copy_and_stops_inside_task_segments() {
    let out = run(&compile("backforth", false), &[]);
    assert!(out.contains("c-backforth: PASS"), "{out}");
    assert!(out.contains("trip 2 destination: memory equals the source's at the pause; kept image used"), "{out}");
    assert!(
        out.contains("trip 3 destination: memory equals the source's at the pause; kept image not used: "),
        "{out}"
    );
    assert!(
        out.contains("trip 4 destination (post-copy): memory equals the source's at the pause; kept image used"),
        "{out}"
    );
}

#[test]
fn c_program_snapshots_and_restores_eagerly_lazily_and_with_replay() {
    let program = compile("restore", false);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-restore");
    std::fs::create_dir_all(&dir).unwrap();
    for backing in ["anon", "memfd"] {
        let out = run(&program, &[dir.to_str().unwrap(), backing]);
        assert!(out.contains("c-restore: PASS"), "{out}");
        assert_eq!(out.matches(" 0 words wrong").count(), 3, "{out}");
        assert_eq!(out.matches("refused as expected").count(), 7, "{out}");
    }
}

#[test]
fn c_error_paths_return_documented_statuses() {
    let out = run(&compile("errors", false), &[]);
    assert!(out.trim_end().ends_with(" 0 failed"), "{out}");
}

#[test]
fn c_program_restarts_its_guest_on_the_source_when_the_destination_is_killed() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-failover");
    std::fs::create_dir_all(&dir).unwrap();
    let out = run(&compile("failover", false), &[dir.to_str().unwrap()]);
    assert!(out.contains("c-failover: PASS"), "{out}");
    assert!(out.contains("destination killed"), "{out}");
    assert!(out.contains(" 0 words wrong"), "{out}");
}
