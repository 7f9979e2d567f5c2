//! Link-time layout of the release binary.
//!
//! The host's start and its idle loop run a few thousand functions spread over the whole code
//! segment, and the kernel maps 64 KiB of the file around each page a process touches: a host
//! that had only started kept nearly all of its code mapped (BENCHMARKS.md (c)).
//! `symbol-order.txt` lists the functions a release host runs from its start until it is idle
//! and stopped, and the linker places them first, side by side, so they share pages.
//! `scripts/symbol-order.py` writes the list again from a run of the release binary.
//!
//! A name the list has and the binary lacks (another compiler or dependency version) is
//! skipped, so a stale list only makes the layout less tight. The ordering is an option of
//! LLD (Rust's linker for `x86_64-unknown-linux-gnu` since 1.90) and of mold; before using it,
//! this script links an empty program with the same compiler, linker and flags and the option,
//! and leaves the option out, with a warning, if that fails (GNU ld, for one, lacks it).
//! `AMS_SYMBOL_ORDER=off` leaves it out without trying.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn main() {
    println!("cargo:rerun-if-changed=symbol-order.txt");
    println!("cargo:rerun-if-env-changed=AMS_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=AMS_LINK_MAP");
    // `scripts/symbol-order.py` reads where each function landed from the linker's map.
    if let Some(map) = env::var_os("AMS_LINK_MAP") {
        link_arg(linker_option("-Map=", &map));
    }
    let target = env::var("TARGET").unwrap_or_default();
    let profile = env::var("PROFILE").unwrap_or_default();
    let off = env::var("AMS_SYMBOL_ORDER").is_ok_and(|v| v == "off");
    if target != "x86_64-unknown-linux-gnu" || profile != "release" || off {
        return;
    }
    let Some(dir) = env::var_os("CARGO_MANIFEST_DIR") else {
        return;
    };
    let list = Path::new(&dir).join("symbol-order.txt");
    if !list.is_file() {
        return;
    }
    let args = [
        linker_option("--symbol-ordering-file=", list.as_os_str()),
        OsString::from("--no-warn-symbol-ordering"),
    ];
    if links_with(&target, &args) {
        for a in args {
            link_arg(a);
        }
    } else {
        println!(
            "cargo:warning=the linker does not take --symbol-ordering-file: amsbuild is linked \
             without its start-up layout (about 4 MB more resident when idle; BENCHMARKS.md (c))"
        );
    }
}

fn linker_option(name: &str, value: &std::ffi::OsStr) -> OsString {
    let mut o = OsString::from(name);
    o.push(value);
    o
}

/// One argument for the linker itself, passed through the compiler driver as it is: no
/// splitting at commas, as `-Wl,` would do.
fn link_arg(arg: OsString) {
    println!("cargo:rustc-link-arg-bins=-Xlinker");
    println!("cargo:rustc-link-arg-bins={}", arg.to_string_lossy());
}

/// Whether an empty program links with `args` given to the linker, built with the compiler,
/// linker and flags this build uses.
fn links_with(target: &str, args: &[OsString]) -> bool {
    let Some(out) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let src = out.join("probe.rs");
    if std::fs::write(&src, "fn main() {}\n").is_err() {
        return false;
    }
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.arg("--crate-type=bin")
        .arg("--target")
        .arg(target)
        .arg("-o")
        .arg(out.join("probe"))
        .arg(&src);
    if let Some(linker) = env::var_os("RUSTC_LINKER") {
        cmd.arg("-C").arg(linker_option("linker=", &linker));
    }
    if let Ok(flags) = env::var("CARGO_ENCODED_RUSTFLAGS") {
        cmd.args(flags.split('\u{1f}').filter(|f| !f.is_empty()));
    }
    for a in args {
        cmd.arg("-C").arg("link-arg=-Xlinker");
        cmd.arg("-C").arg(linker_option("link-arg=", a));
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
