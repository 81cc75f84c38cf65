//! The command line as a new user meets it: help on every command, and a mistake is one line and
//! exit status 2, never a backtrace. Needs no /dev/kvm.

use std::process::Command;

fn vmm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry-vmm")).args(args).output().expect("run ferry-vmm")
}

#[test]
fn every_command_has_help_with_its_defaults() {
    let top = vmm(&["--help"]);
    assert!(top.status.success());
    let text = String::from_utf8_lossy(&top.stdout);
    for command in ["run", "demo", "migrate", "receive", "snapshot", "restore"] {
        assert!(text.contains(command), "{command} missing from --help:\n{text}");
        let help = vmm(&[command, "--help"]);
        assert!(help.status.success(), "{command} --help failed");
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(text.contains("[default:"), "{command} --help shows no defaults:\n{text}");
    }
}

#[test]
fn a_users_mistake_is_one_clear_line_not_a_backtrace() {
    for args in [
        &["demo", "--workload", "nope"][..],
        &["demo", "--seconds", "-1"],
        &["demo", "--mem", "lots"],
        &["demo", "--vcpus", "0"],
        &["demo", "--inject", "flood=3"],
        &["demo", "--trips", "2", "--transport", "local"],
        &["demo", "--trips", "2", "--mode", "ft"],
        &["demo", "--trips", "2", "--checkpoint-ms", "50"],
        &["demo", "--dirty-percent", "5"],
        &["demo", "--trips", "2", "--dirty-percent", "5", "--data-mib", "8"],
        &["migrate", "--to", "127.0.0.1:1", "--trips", "2"],
        &["demo", "--task-guided", "on", "--mode", "postcopy"],
        &["demo", "--task-guided", "maybe"],
        &["demo", "--workload", "rand-write", "--heavy-ms", "5"],
        &["restore"],
        &["teleport"],
    ] {
        let out = vmm(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("backtrace") && !err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn completions_cover_every_command_and_option() {
    for shell in ["bash", "zsh", "fish"] {
        let out = vmm(&["completions", shell]);
        assert!(out.status.success(), "completions {shell} failed");
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["demo", "receive", "restore", "encryption", "plot", "task-guided"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    assert!(!vmm(&["completions", "cmd.exe"]).status.success(), "an unknown shell is a usage error");
}
